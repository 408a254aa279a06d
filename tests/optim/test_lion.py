import functools

import pytest
import torch
from optim_harness import (
    assert_all_equal,
    assert_foreach_equals_per_tensor,
    assert_invalid_hyperparameter_raises,
    closure_step,
    random_params,
    resume_from_state_dict,
    run_seeded,
    single_rank_mesh,
)

from lm_opt.optim.lion import Lion

SHAPES = [(7,), (5, 3), (2, 3, 4)]
N_STEPS = 25


def make_params(dtype=torch.float64, seed=0):
    """Parameters of several shapes, one more for a second group, a zero-grad and a no-grad one."""
    gen = torch.Generator().manual_seed(seed)
    return random_params(SHAPES, gen, dtype), random_params([(4, 6), (3,), (2, 2)], gen, dtype)


def set_grads(group_a, group_b, gen):
    for p in group_a + group_b[:1]:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    group_b[1].grad = torch.zeros_like(group_b[1])
    group_b[2].grad = None


def make_optimizer(group_a, group_b, **kwargs):
    return Lion(
        [{"params": group_a}, {"params": group_b, "lr": 3e-3, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        **kwargs,
    )


run = functools.partial(run_seeded, set_grads)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_equations(foreach):
    group_a, group_b = make_params()
    ref = [p.clone() for p in group_a + group_b]
    ref_m = [torch.zeros_like(p) for p in ref]
    opt = make_optimizer(group_a, group_b, foreach=foreach)
    lrs, wds = [1e-2] * 3 + [3e-3] * 3, [0.1] * 3 + [0.0] * 3
    beta1, beta2 = 0.9, 0.95
    gen = torch.Generator().manual_seed(1)
    for t in range(N_STEPS):
        # A schedule rewrites group["lr"] every step; the optimizer must follow it.
        scale = 1.0 / (1 + t)
        for group, base in zip(opt.param_groups, [1e-2, 3e-3]):
            group["lr"] = base * scale
        set_grads(group_a, group_b, gen)
        opt.step()
        for i, p in enumerate(group_a + group_b):
            if p.grad is None:
                continue
            lr, g = lrs[i] * scale, p.grad
            ref[i] = ref[i] * (1 - lr * wds[i])
            ref[i] = ref[i] - lr * torch.sign(beta1 * ref_m[i] + (1 - beta1) * g)
            ref_m[i] = beta2 * ref_m[i] + (1 - beta2) * g
            torch.testing.assert_close(p, ref[i], rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref_m[i], rtol=1e-6, atol=1e-12)

    untouched = group_b[2]
    assert torch.equal(untouched, make_params()[1][2])
    assert untouched not in opt.state
    assert torch.equal(opt.state[group_b[1]]["exp_avg"], torch.zeros(3, dtype=torch.float64))


def test_foreach_equals_per_tensor():
    def run_with(foreach):
        group_a, group_b = make_params(dtype=torch.float32)
        group_a[1] = group_a[1].bfloat16()
        run(make_optimizer(group_a, group_b, foreach=foreach), group_a, group_b, N_STEPS)
        return group_a + group_b

    assert_foreach_equals_per_tensor(run_with)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_bit_for_bit(foreach):
    group_a, group_b = make_params(dtype=torch.float32)
    group_a[0] = group_a[0].bfloat16()
    opt = make_optimizer(group_a, group_b, foreach=foreach)
    run(opt, group_a, group_b, 10)

    resumed, fresh_a, fresh_b = resume_from_state_dict(
        opt, group_a, group_b, functools.partial(make_optimizer, foreach=foreach)
    )
    assert resumed.state[fresh_a[0]]["exp_avg"].dtype == torch.float32

    run(opt, group_a, group_b, 10, seed=2)
    run(resumed, fresh_a, fresh_b, 10, seed=2)
    assert_all_equal(group_a + group_b, fresh_a + fresh_b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (-0.1, 0.99)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    assert_invalid_hyperparameter_raises(functools.partial(Lion, [torch.zeros(2)]), kwargs, name)


@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_params_keep_fp32_state(foreach):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, generator=gen).bfloat16()
    start = p.float()
    opt = Lion([p], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    p.grad = torch.randn(4, 5, generator=gen).bfloat16()
    opt.step()
    assert p.dtype == torch.bfloat16
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    # The update is applied in float32, then rounded once into bf16.
    expected = start * (1 - 1e-2 * 0.1) - 1e-2 * torch.sign(p.grad.float())
    assert torch.equal(p, expected.bfloat16())


def test_step_returns_closure_loss():
    p, loss = closure_step(Lion, lr=0.1)
    assert loss.item() == 3.0
    assert torch.equal(p.detach(), torch.full((3,), 0.1))


def test_works_on_dtensor():
    from torch.distributed.tensor import Shard, distribute_tensor

    with single_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(0)
        plain = torch.randn(4, 3, generator=gen)
        grads = [torch.randn(4, 3, generator=gen) for _ in range(3)]
        sharded = distribute_tensor(plain.clone(), mesh, [Shard(0)])
        opt_plain, opt_sharded = Lion([plain], lr=0.1), Lion([sharded], lr=0.1)
        for g in grads:
            plain.grad, sharded.grad = g, distribute_tensor(g, mesh, [Shard(0)])
            opt_plain.step()
            opt_sharded.step()
        assert torch.equal(sharded.full_tensor(), plain)


@pytest.mark.slow
def test_fused_matches_foreach():
    """The compiled step agrees with the eager one up to rounding, bf16 parameters included."""

    def run_with(**kwargs):
        group_a, group_b = make_params(dtype=torch.float32)
        group_a[1] = group_a[1].bfloat16()
        opt = make_optimizer(group_a, group_b, **kwargs)
        gen = torch.Generator().manual_seed(1)
        for t in range(N_STEPS):
            for group, base in zip(opt.param_groups, [1e-2, 3e-3]):
                group["lr"] = base / (1 + t)  # a schedule must not recompile or be ignored
            set_grads(group_a, group_b, gen)
            opt.step()
        return group_a + group_b, opt

    eager, _ = run_with(foreach=True)
    fused, opt = run_with(fused=True)
    for p, q in zip(fused, eager):
        torch.testing.assert_close(p, q)
    assert opt.state[fused[1]]["exp_avg"].dtype == torch.float32
    assert fused[-1] not in opt.state


def test_fused_falls_back_to_eager_on_dtensor():
    from torch.distributed.tensor import Shard, distribute_tensor

    with single_rank_mesh() as mesh:
        gen = torch.Generator().manual_seed(0)
        plain = torch.randn(4, 3, generator=gen)
        sharded = distribute_tensor(plain.clone(), mesh, [Shard(0)])
        opt_plain, opt_sharded = Lion([plain], lr=0.1), Lion([sharded], lr=0.1, fused=True)
        g = torch.randn(4, 3, generator=gen)
        plain.grad, sharded.grad = g, distribute_tensor(g, mesh, [Shard(0)])
        opt_plain.step()
        opt_sharded.step()
        assert torch.equal(sharded.full_tensor(), plain)
