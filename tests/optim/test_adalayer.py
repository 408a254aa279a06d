import functools

import pytest
import torch
from optim_harness import (
    assert_all_equal,
    assert_foreach_equals_per_tensor,
    assert_invalid_hyperparameter_raises,
    resume_from_state_dict,
    run_scheduled,
)
import torch.distributed as dist

from lm_opt.optim.adalayer import Adalayer

N_STEPS = 25
BASE_LRS = [1e-2, 3e-3]
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1


def make_params(dtype=torch.float64, seed=0):
    """Two groups: 1-D, 2-D and 3-D tensors, one with zero grads and one with no grad."""
    gen = torch.Generator().manual_seed(seed)
    group_a = [torch.randn(s, generator=gen, dtype=dtype) for s in [(12,), (6, 4), (6, 4)]]
    group_b = [torch.randn(s, generator=gen, dtype=dtype) for s in [(4, 3, 2), (4,)]]
    return group_a, group_b


def make_grads(group_a, group_b, n_steps, seed=1):
    """Per step, the gradient of each parameter: random with per-row scales, zeros, or None."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        grads = []
        for p in group_a[:2] + group_b[:1]:
            row_scale = torch.logspace(-1, 1, p.shape[0], dtype=p.dtype).reshape(
                -1, *[1] * (p.ndim - 1)
            )
            grads.append(torch.randn(p.shape, generator=gen, dtype=p.dtype) * row_scale)
        steps.append(grads[:2] + [torch.zeros_like(group_a[2])] + grads[2:] + [None])
    return steps


def lr_factor(t):
    """A schedule that rewrites group["lr"] every step; the optimizer must follow it."""
    return 1.0 / (1 + 0.1 * t)


def make_optimizer(
    group_a, group_b, blocks=("tensor", "tensor"), keep_adapting=(False, False), **kwargs
):
    return Adalayer(
        [
            {"params": group_a, "blocks": blocks[0], "keep_adapting": keep_adapting[0]},
            {
                "params": group_b,
                "blocks": blocks[1],
                "keep_adapting": keep_adapting[1],
                "lr": BASE_LRS[1],
            },
        ],
        lr=BASE_LRS[0],
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
        **kwargs,
    )


def run(opt, params, grad_steps, first_step=1):
    run_scheduled(opt, params, grad_steps, BASE_LRS, lr_factor, first_step)


def n_blocks_of(shape, blocks):
    return {"tensor": 1, "row": shape[0]}.get(blocks, blocks)


def reference_adalayer(p, grads, base_lr, n_blocks, freeze_after=None, keep_adapting=False):
    """The equations as a plain loop over steps; returns the parameter and v after each step."""
    beta1, beta2 = BETAS
    m, v = torch.zeros_like(p), torch.zeros(n_blocks, dtype=p.dtype)
    block_history, trajectory = [], []
    for t, g in enumerate(grads, start=1):
        lr = base_lr * lr_factor(t)
        block_mean_sq = (g.reshape(n_blocks, -1) ** 2).mean(dim=1)
        m = beta1 * m + (1 - beta1) * g
        if freeze_after is None:
            v = beta2 * v + (1 - beta2) * block_mean_sq
            v_hat = v / (1 - beta2**t)
        else:
            if t <= freeze_after:
                block_history.append(block_mean_sq)
                v = torch.stack(block_history).mean(dim=0)
                lr = 0.0
            elif keep_adapting:
                v = beta2 * v + (1 - beta2) * block_mean_sq
            v_hat = v
        m_hat = m / (1 - beta1**t)
        denom = (v_hat.sqrt() + EPS).repeat_interleave(p.numel() // n_blocks).reshape(p.shape)
        p = p * (1 - lr * WEIGHT_DECAY) - lr * m_hat / denom
        trajectory.append((p, v))
    return trajectory


def check_against_reference(
    opt, group_a, group_b, grad_steps, blocks, freeze_after=None, keep_adapting=(False, False)
):
    initial = [p.clone() for p in group_a + group_b]
    params = group_a + group_b
    group_of = [0] * len(group_a) + [1] * len(group_b)
    references = [
        reference_adalayer(
            p0,
            [grads[i] for grads in grad_steps],
            BASE_LRS[group_of[i]],
            n_blocks_of(p0.shape, blocks[group_of[i]]),
            freeze_after,
            keep_adapting[group_of[i]],
        )
        for i, p0 in enumerate(initial[:-1])
    ]
    for t, grads in enumerate(grad_steps, start=1):
        run(opt, params, [grads], first_step=t)
        for p, trajectory in zip(params, references):
            p_ref, v_ref = trajectory[t - 1]
            torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v_ref, rtol=1e-6, atol=1e-12)

    untouched = params[-1]
    assert torch.equal(untouched, initial[-1])
    assert untouched not in opt.state


@pytest.mark.parametrize("blocks", [("tensor", "tensor"), ("row", 2), (3, "row")])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_equations(blocks, foreach):
    group_a, group_b = make_params()
    opt = make_optimizer(group_a, group_b, blocks=blocks, foreach=foreach)
    grad_steps = make_grads(group_a, group_b, N_STEPS)
    check_against_reference(opt, group_a, group_b, grad_steps, blocks)
    zero_grad_param = group_a[2]
    assert torch.equal(
        opt.state[zero_grad_param]["exp_avg_sq"],
        torch.zeros(n_blocks_of((6, 4), blocks[0]), dtype=torch.float64),
    )


@pytest.mark.parametrize("foreach", [False, True])
def test_frozen_matches_reference_equations(foreach):
    group_a, group_b = make_params()
    keep_adapting = (False, True)
    opt = make_optimizer(
        group_a,
        group_b,
        blocks=("row", 2),
        keep_adapting=keep_adapting,
        freeze_after=5,
        foreach=foreach,
    )
    grad_steps = make_grads(group_a, group_b, N_STEPS)
    check_against_reference(opt, group_a, group_b, grad_steps, ("row", 2), 5, keep_adapting)


def test_frozen_holds_params_then_freezes_v_unless_keep_adapting():
    group_a, group_b = make_params()
    params = group_a + group_b
    opt = make_optimizer(group_a, group_b, keep_adapting=(False, True), freeze_after=5)
    grad_steps = make_grads(group_a, group_b, 12)
    initial = [p.clone() for p in params]
    frozen, adapting = group_a[0], group_b[0]
    block_means = []
    for t, grads in enumerate(grad_steps, start=1):
        run(opt, params, [grads], first_step=t)
        if t <= 5:
            block_means.append(grads[0].square().mean())
            assert all(torch.equal(p, p0) for p, p0 in zip(params, initial))
            assert opt.effective_lr(frozen).eq(0).all()
            torch.testing.assert_close(
                opt.state[frozen]["exp_avg_sq"], torch.stack(block_means).mean().reshape(1)
            )
            v_frozen = opt.state[frozen]["exp_avg_sq"].clone()
            v_adapting = opt.state[adapting]["exp_avg_sq"].clone()
        else:
            assert not torch.equal(frozen, initial[0])
            assert torch.equal(opt.state[frozen]["exp_avg_sq"], v_frozen)
            assert not torch.equal(opt.state[adapting]["exp_avg_sq"], v_adapting)
            v_adapting = opt.state[adapting]["exp_avg_sq"].clone()
            # No second-moment bias correction in frozen mode.
            expected = opt.param_groups[0]["lr"] / (v_frozen.sqrt() + EPS)
            torch.testing.assert_close(opt.effective_lr(frozen), expected)


def test_row_blocks_give_one_lr_per_logit():
    vocab, d = 11, 4
    head = torch.zeros(vocab, d, dtype=torch.float64)
    opt = Adalayer([head], lr=1e-2, blocks="row")
    assert opt.effective_lr(head) is None
    gen = torch.Generator().manual_seed(0)
    row_scale = torch.arange(1, vocab + 1, dtype=torch.float64)[:, None]
    grads = [
        torch.randn(vocab, d, generator=gen, dtype=torch.float64) * row_scale for _ in range(3)
    ]
    for g in grads:
        head.grad = g
        opt.step()
    lrs = opt.effective_lr(head)
    assert lrs.shape == (vocab,)
    assert lrs.unique().numel() == vocab
    beta2 = BETAS[1]
    v = sum((1 - beta2) * beta2 ** (2 - i) * g.square().mean(dim=1) for i, g in enumerate(grads))
    torch.testing.assert_close(lrs, 1e-2 / ((v / (1 - beta2**3)).sqrt() + EPS))


def test_chunked_blocks_scale_each_chunk_by_its_own_second_moment():
    d = 4
    qkv = torch.zeros(3 * d, d, dtype=torch.float64)
    opt = Adalayer([qkv], lr=1e-2, blocks=3)
    gen = torch.Generator().manual_seed(0)
    chunk_scale = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).repeat_interleave(d)
    g = torch.randn(3 * d, d, generator=gen, dtype=torch.float64) * chunk_scale[:, None]
    qkv.grad = g
    opt.step()
    lrs = opt.effective_lr(qkv)
    assert lrs.shape == (3,)
    assert lrs[0] > lrs[1] > lrs[2]
    # At step 1 the bias-corrected moments are g and the chunk's mean of g^2.
    for k, chunk in enumerate(g.split(d)):
        expected = -1e-2 * chunk / (chunk.square().mean().sqrt() + EPS)
        torch.testing.assert_close(qkv[k * d : (k + 1) * d], expected)


def test_indivisible_chunks_name_shape_and_k():
    with pytest.raises(ValueError, match=r"blocks=3.*\(10, 4\)"):
        Adalayer([torch.zeros(10, 4)], blocks=3)
    opt = Adalayer([torch.zeros(9, 4)], blocks=3)
    with pytest.raises(ValueError, match=r"blocks=4.*\(10, 4\)"):
        opt.add_param_group({"params": [torch.zeros(10, 4)], "blocks": 4})
    assert len(opt.param_groups) == 1


def test_foreach_equals_per_tensor():
    def run_with(foreach):
        group_a, group_b = make_params(dtype=torch.float32)
        group_a[1] = group_a[1].bfloat16()
        opt = make_optimizer(
            group_a,
            group_b,
            blocks=("row", 2),
            keep_adapting=(False, True),
            freeze_after=4,
            foreach=foreach,
        )
        run(opt, group_a + group_b, make_grads(group_a, group_b, N_STEPS))
        return group_a + group_b

    assert_foreach_equals_per_tensor(run_with)


@pytest.mark.parametrize("freeze_after", [None, 12])
def test_state_dict_round_trip_continues_bit_for_bit(freeze_after):
    group_a, group_b = make_params(dtype=torch.float32)
    group_a[0] = group_a[0].bfloat16()
    params = group_a + group_b
    grad_steps = make_grads(group_a, group_b, 20)
    opt = make_optimizer(group_a, group_b, blocks=("row", 2), freeze_after=freeze_after)
    run(opt, params, grad_steps[:8])

    make = functools.partial(make_optimizer, blocks=("row", 2), freeze_after=freeze_after)
    resumed, fresh_a, fresh_b = resume_from_state_dict(opt, group_a, group_b, make)
    assert resumed.state[fresh_a[0]]["exp_avg"].dtype == torch.float32

    run(opt, params, grad_steps[8:], first_step=9)
    run(resumed, fresh_a + fresh_b, grad_steps[8:], first_step=9)
    assert_all_equal(params, fresh_a + fresh_b)


def test_bf16_params_keep_fp32_state():
    group_a, group_b = make_params(dtype=torch.float32)
    reference = make_params(dtype=torch.float32)
    low = [p.bfloat16() for p in group_a], [p.bfloat16() for p in group_b]
    grad_steps = make_grads(group_a, group_b, 5)
    opt = make_optimizer(*low, blocks=("row", 2))
    run(opt, low[0] + low[1], grad_steps)
    run(make_optimizer(*reference, blocks=("row", 2)), reference[0] + reference[1], grad_steps)
    for p, p32 in zip(low[0] + low[1], reference[0] + reference[1]):
        assert p.dtype == torch.bfloat16
        if p in opt.state:
            assert {v.dtype for v in opt.state[p].values()} == {torch.float32}
        torch.testing.assert_close(p.float(), p32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (-0.1, 0.99)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"blocks": "column"}, "blocks"),
        ({"blocks": 0}, "blocks"),
        ({"blocks": True}, "blocks"),
        ({"freeze_after": 0}, "freeze_after"),
        ({"freeze_after": 2.5}, "freeze_after"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    make = functools.partial(Adalayer, [torch.zeros(6, 2)])
    assert_invalid_hyperparameter_raises(make, kwargs, name)


def test_block_layout():
    assert Adalayer.block_layout("last_layer", n_head=4) == "row"
    assert Adalayer.block_layout("matrix", n_head=4, fused=3) == 3
    for role in ["embedding", "matrix", "norm"]:
        assert Adalayer.block_layout(role, n_head=4) == "tensor"
    with pytest.raises(ValueError, match="role"):
        Adalayer.block_layout("bias", n_head=4)


def test_step_returns_closure_loss():
    p = torch.ones(3, requires_grad=True)
    opt = Adalayer([p])

    def closure():
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0


@pytest.mark.parametrize("foreach", [False, True])
def test_strided_parameter_is_updated_like_a_contiguous_one(foreach):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    strided, contiguous = base.t(), base.t().contiguous()
    grads = [torch.randn(6, 4, generator=gen) for _ in range(3)]
    opts = [Adalayer([p], lr=1e-2, blocks="row", foreach=foreach) for p in (strided, contiguous)]
    for g in grads:
        for p, opt in zip((strided, contiguous), opts):
            p.grad = g
            opt.step()
    assert torch.equal(strided, contiguous)


@pytest.mark.slow
@pytest.mark.parametrize("freeze_after", [None, 4])
def test_fused_matches_foreach(freeze_after):
    """The compiled step agrees with the eager one up to rounding (bf16, row and chunk blocks)."""

    def run_with(**kwargs):
        group_a, group_b = make_params(dtype=torch.float32)
        group_a[1] = group_a[1].bfloat16()
        opt = make_optimizer(
            group_a, group_b, blocks=("row", 2), keep_adapting=(False, True), freeze_after=freeze_after, **kwargs
        )
        run(opt, group_a + group_b, make_grads(group_a, group_b, N_STEPS))
        return group_a + group_b, opt

    (fused, opt), (eager, ref) = run_with(fused=True), run_with(foreach=True)
    for p, q in zip(fused, eager):
        torch.testing.assert_close(p, q)
        if p in opt.state:
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
