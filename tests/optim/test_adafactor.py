import functools

import pytest
import torch
from optim_harness import (
    assert_all_equal,
    assert_foreach_equals_per_tensor,
    assert_invalid_hyperparameter_raises,
    random_params,
    resume_from_state_dict,
    run_seeded,
)

from lm_opt.optim.adafactor import Adafactor, factored_denominator, factored_second_moment

SHAPES_A = [(7,), (5, 3), (2, 3, 4)]
# A second group: one with gradients, two with all-zero gradients, one without a gradient.
SHAPES_B = [(4, 6), (3, 5), (3,), (2, 2)]
N_STEPS = 25
BETAS = (0.9, 0.95)


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return random_params(SHAPES_A, gen, dtype), random_params(SHAPES_B, gen, dtype)


def set_grads(group_a, group_b, gen):
    for p in group_a + group_b[:1]:
        # Scales that differ per row and column, as in a network, so the factoring matters.
        scale = torch.rand(p.shape, generator=gen, dtype=p.dtype) * 3
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
    for p in group_b[1:3]:
        p.grad = torch.zeros_like(p)
    group_b[3].grad = None


def make_optimizer(group_a, group_b, **kwargs):
    return Adafactor(
        [{"params": group_a}, {"params": group_b, "lr": 3e-3, "eps": 1e-3, "weight_decay": 0.0}],
        lr=1e-2,
        betas=BETAS,
        eps=1e-15,
        weight_decay=0.1,
        **kwargs,
    )


run = functools.partial(run_seeded, set_grads)


def reference_reconstruction(row, col):
    """outer(R, C) / mean(R) for each matrix of the batch; zero where R is all zero."""
    if row.ndim > 1:
        return torch.stack([reference_reconstruction(r, c) for r, c in zip(row, col)])
    if row.mean() == 0:
        return torch.zeros(len(row), len(col), dtype=row.dtype)
    return torch.outer(row, col) / row.mean()


class ReferenceAdafactor:
    """The equations of Adafactor*, one tensor at a time, written out plainly."""

    def __init__(self, p, vector_moment="scalar"):
        self.p, self.m, self.t = p.clone(), torch.zeros_like(p), 0
        self.vector_moment = vector_moment
        if p.ndim >= 2:
            self.row = torch.zeros(p.shape[:-1], dtype=p.dtype)
            self.col = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype)
        else:
            self.v = torch.zeros_like(p)

    def second_moment(self):
        if self.p.ndim >= 2:
            return reference_reconstruction(self.row, self.col)
        return self.v

    def v_hat(self):
        return self.second_moment() / (1 - BETAS[1] ** self.t)

    def step(self, g, lr, eps, weight_decay):
        beta1, beta2 = BETAS
        self.t += 1
        self.m = beta1 * self.m + (1 - beta1) * g
        if self.p.ndim >= 2:
            self.row = beta2 * self.row + (1 - beta2) * (g**2).mean(dim=-1)
            self.col = beta2 * self.col + (1 - beta2) * (g**2).mean(dim=-2)
        elif self.vector_moment == "scalar":  # the study's code: mean(dim=[]) over the vector
            self.v = beta2 * self.v + (1 - beta2) * (g**2).mean() * torch.ones_like(g)
        else:
            self.v = beta2 * self.v + (1 - beta2) * g**2
        m_hat = self.m / (1 - beta1**self.t)
        self.p = self.p * (1 - lr * weight_decay) - lr * m_hat / (self.v_hat().sqrt() + eps)


@pytest.mark.parametrize("vector_moment", ["scalar", "full"])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_equations(foreach, vector_moment):
    group_a, group_b = make_params()
    refs = [ReferenceAdafactor(p, vector_moment) for p in group_a + group_b]
    opt = make_optimizer(group_a, group_b, foreach=foreach, vector_moment=vector_moment)
    hypers = [(1e-2, 1e-15, 0.1)] * len(group_a) + [(3e-3, 1e-3, 0.0)] * len(group_b)
    gen = torch.Generator().manual_seed(1)
    for t in range(N_STEPS):
        # A schedule rewrites group["lr"] every step; the optimizer must follow it.
        scale = 1.0 / (1 + t)
        for group, base in zip(opt.param_groups, [1e-2, 3e-3]):
            group["lr"] = base * scale
        set_grads(group_a, group_b, gen)
        opt.step()
        for p, ref, (lr, eps, wd) in zip(group_a + group_b, refs, hypers):
            if p.grad is None:
                continue
            ref.step(p.grad, lr * scale, eps, wd)
            torch.testing.assert_close(p, ref.p, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(opt.state[p]["exp_avg"], ref.m, rtol=1e-6, atol=1e-12)

    for p, ref, (lr, eps, _) in zip(group_a + group_b, refs, hypers):
        if p.grad is not None:
            expected = lr * scale / (ref.v_hat().sqrt() + eps)
            torch.testing.assert_close(opt.effective_lr(p), expected, rtol=1e-6, atol=0)
    untouched = group_b[3]
    assert torch.equal(untouched, make_params()[1][3])
    assert untouched not in opt.state
    assert opt.effective_lr(untouched) is None
    for zero_grad in group_b[1:3]:
        assert torch.equal(zero_grad, make_params()[1][SHAPES_B.index(tuple(zero_grad.shape))])


def test_state_is_factored_over_the_last_two_dims():
    p = torch.zeros(2, 3, 4)
    vector = torch.zeros(5)
    opt = Adafactor([p, vector])
    p.grad, vector.grad = torch.ones_like(p), torch.ones_like(vector)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col"}
    assert opt.state[p]["exp_avg_sq_row"].shape == (2, 3)
    assert opt.state[p]["exp_avg_sq_col"].shape == (2, 4)
    assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["step"].dtype == torch.float32


def test_a_vector_has_one_second_moment_the_mean_of_its_squared_gradient():
    """The study's Adafactor* (and its SGD + Adafactor hybrid): `mean(dim=[])` over a 1-D tensor."""
    vector = torch.zeros(4, dtype=torch.float64)
    opt = Adafactor([vector], lr=1.0, betas=(0.0, 0.5), eps=1e-300)
    vector.grad = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    opt.step()
    # v = (1 - 0.5) * mean(g^2) = 0.5 * 7.5; v_hat = v / (1 - 0.5) = 7.5; update g / sqrt(7.5).
    assert opt.state[vector]["exp_avg_sq"].shape == ()
    torch.testing.assert_close(opt.state[vector]["exp_avg_sq"], torch.tensor(3.75, dtype=torch.float64))
    torch.testing.assert_close(vector, -vector.grad / 7.5**0.5)
    full = torch.zeros(4, dtype=torch.float64)
    full.grad = vector.grad.clone()
    opt_full = Adafactor([full], lr=1.0, betas=(0.0, 0.5), eps=1e-300, vector_moment="full")
    opt_full.step()
    torch.testing.assert_close(full, -torch.ones(4, dtype=torch.float64))  # Adam: g / |g|


def test_reconstruction_matches_formula():
    gen = torch.Generator().manual_seed(0)
    row = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    col = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        factored_second_moment(row, col), reference_reconstruction(row, col), rtol=1e-12, atol=0
    )
    zeros = torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert torch.equal(factored_second_moment(*zeros), torch.zeros(3, 4, dtype=torch.float64))


def test_denominator_is_the_root_of_the_reconstruction():
    gen = torch.Generator().manual_seed(0)
    row = torch.rand(2, 3, generator=gen, dtype=torch.float64)
    col = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    expected = (factored_second_moment(row, col) / 0.3).sqrt() + 1e-6
    torch.testing.assert_close(factored_denominator(row, col, 0.3, 1e-6), expected, rtol=1e-12, atol=0)
    zeros = torch.zeros(3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert torch.equal(factored_denominator(*zeros, 0.3, 1e-6), torch.full((3, 4), 1e-6, dtype=torch.float64))


def test_reconstruction_is_exact_for_rank_one():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, generator=gen, dtype=torch.float64)
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    grad_sq = torch.outer(u, v) ** 2
    rebuilt = factored_second_moment(grad_sq.mean(dim=-1), grad_sq.mean(dim=-2))
    torch.testing.assert_close(rebuilt, grad_sq, rtol=1e-12, atol=0)

    # Through the optimizer: after one step v_hat = g^2, so the step is lr * g / (|g| + eps).
    p = torch.zeros(6, 5, dtype=torch.float64)
    opt = Adafactor([p], lr=0.1, eps=1e-8)
    p.grad = torch.outer(u, v)
    opt.step()
    expected_lr = 0.1 / (p.grad.abs() + 1e-8)
    torch.testing.assert_close(opt.effective_lr(p), expected_lr, rtol=1e-10, atol=0)
    torch.testing.assert_close(p, -expected_lr * p.grad, rtol=1e-10, atol=0)


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
    group_a[2] = group_a[2].bfloat16()
    opt = make_optimizer(group_a, group_b, foreach=foreach)
    run(opt, group_a, group_b, 10)

    resumed, fresh_a, fresh_b = resume_from_state_dict(
        opt, group_a, group_b, functools.partial(make_optimizer, foreach=foreach)
    )
    for key in ["exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "step"]:
        assert resumed.state[fresh_a[2]][key].dtype == torch.float32

    run(opt, group_a, group_b, 10, seed=2)
    run(resumed, fresh_a, fresh_b, 10, seed=2)
    assert_all_equal(group_a + group_b, fresh_a + fresh_b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (-0.1, 0.95)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9, 0.95, 0.99)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    make = functools.partial(Adafactor, [torch.zeros(2)])
    assert_invalid_hyperparameter_raises(make, kwargs, name)


@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_params_keep_fp32_state(foreach):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, generator=gen).bfloat16()
    vector = torch.randn(5, generator=gen).bfloat16()
    start = [p.float(), vector.float()]
    opt = Adafactor([p, vector], lr=1e-2, weight_decay=0.1, foreach=foreach)
    for q in (p, vector):
        q.grad = torch.randn(q.shape, generator=gen).bfloat16()
    opt.step()
    for q, q0 in zip((p, vector), start):
        assert q.dtype == torch.bfloat16
        assert all(s.dtype == torch.float32 for s in opt.state[q].values())
        ref = ReferenceAdafactor(q0)
        ref.step(q.grad.float(), 1e-2, 1e-15, 0.1)
        torch.testing.assert_close(q, ref.p.bfloat16(), rtol=0, atol=0)
