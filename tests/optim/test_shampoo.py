import functools

import pytest
import torch
from optim_harness import (
    adamw_best_steps,
    assert_all_equal,
    assert_invalid_hyperparameter_raises,
    best_steps,
    closure_step,
    mode_product,
    random_params,
    resume_from_state_dict,
    unfold,
)

from lm_opt.optim.shampoo import Shampoo

N_STEPS = 25
FREQ = 4  # inverse roots recomputed at steps 1, 5, 9, ..., 25


class ReferenceShampoo:
    """Shampoo's equations for one tensor, written out with explicit matrices."""

    def __init__(self, param, preconditioned, *, betas, shampoo_beta, eps, exponent, grafting):
        self.p = param.clone()
        self.preconditioned = preconditioned  # one bool per dim
        self.beta1, self.beta2 = betas
        self.beta_s = betas[1] if shampoo_beta == -1 else shampoo_beta
        self.eps, self.exponent, self.grafting = eps, exponent, grafting
        self.t = 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self.factors = [
            torch.zeros(d, d, dtype=param.dtype) if pre else None
            for d, pre in zip(param.shape, preconditioned)
        ]

    def root(self, factor):
        """(factor + eps I)^exponent from the eigendecomposition of the damped matrix."""
        damped = factor + self.eps * torch.eye(len(factor), dtype=factor.dtype)
        vals, vecs = torch.linalg.eigh(damped)
        return vecs @ torch.diag(vals**self.exponent) @ vecs.T

    def step(self, g, lr, wd):
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        self.v = self.beta2 * self.v + (1 - self.beta2) * g**2
        m_hat = self.m / (1 - self.beta1**self.t)
        adam = m_hat / ((self.v / (1 - self.beta2**self.t)).sqrt() + self.eps)
        if not any(self.preconditioned):
            update = adam
        else:
            for i, f in enumerate(self.factors):
                if f is not None:
                    gram = unfold(g, i) @ unfold(g, i).T
                    self.factors[i] = self.beta_s * f + (1 - self.beta_s) * gram
            if (self.t - 1) % FREQ == 0:
                self.roots = [None if f is None else self.root(f) for f in self.factors]
            update = m_hat
            for i, r in enumerate(self.roots):
                if r is not None:
                    update = mode_product(update, r, i)
            if self.grafting == "adam" and update.norm() > 0:
                update = update * adam.norm() / update.norm()
        self.p = (self.p - lr * update) * (1 - lr * wd)


def make_params(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    group_a = random_params([(6, 6), (7,), (2, 3, 4)], gen, dtype)
    return group_a, random_params([(12, 6), (4, 4), (5,), (3, 3)], gen, dtype)


# Group b has max_precond_dim=8, so the 12 of (12, 6) is not preconditioned.
PRECONDITIONED = [[True, True], [False], [True, True, True], [False, True], [True, True], [False]]


def make_optimizer(group_a, group_b, **kwargs):
    return Shampoo(
        [
            {"params": group_a},
            {"params": group_b, "lr": 3e-3, "weight_decay": 0.0, "max_precond_dim": 8},
        ],
        lr=1e-2,
        weight_decay=0.1,
        precondition_frequency=FREQ,
        **kwargs,
    )


def set_grads(group_a, group_b, t):
    gen = torch.Generator().manual_seed(1000 + t)
    for p in group_a + group_b[:2]:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
    if t in (0, 9):  # zero on the very first step (a zero factor) and mid-run
        group_b[1].grad.zero_()
    group_b[2].grad = torch.zeros_like(group_b[2])
    group_b[3].grad = None


VARIANTS = [
    {},
    {"betas": (0.9, 0.99), "shampoo_beta": 0.8, "eps": 1e-4, "exponent": -0.5, "grafting": "none"},
]


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_matches_reference_equations(kwargs):
    group_a, group_b = make_params()
    opt = make_optimizer(group_a, group_b, **kwargs)
    hyper = {
        "betas": (0.95, 0.95),
        "shampoo_beta": -1,
        "eps": 1e-12,
        "exponent": -0.25,
        "grafting": "adam",
    } | kwargs
    params = group_a + group_b[:3]
    refs = [ReferenceShampoo(p, pre, **hyper) for p, pre in zip(params, PRECONDITIONED)]
    lrs, wds = [1e-2] * 3 + [3e-3] * 3, [0.1] * 3 + [0.0] * 3
    for t in range(N_STEPS):
        # A schedule rewrites group["lr"] every step; the optimizer must follow it.
        scale = 1.0 / (1 + 0.1 * t)
        for group, base in zip(opt.param_groups, [1e-2, 3e-3]):
            group["lr"] = base * scale
        set_grads(group_a, group_b, t)
        opt.step()
        for p, ref, lr, wd in zip(params, refs, lrs, wds):
            ref.step(p.grad, lr * scale, wd)
            torch.testing.assert_close(p, ref.p, rtol=1e-6, atol=1e-10)

    assert opt.state[group_b[0]]["precond"][0] is None  # the side above max_precond_dim
    assert torch.equal(group_b[2], make_params()[1][2])  # always-zero grad, no decay
    untouched = group_b[3]
    assert torch.equal(untouched, make_params()[1][3])
    assert untouched not in opt.state


def test_unpreconditioned_tensors_take_torch_adam_step():
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(7,), (12, 10)]]
    copies = [p.clone() for p in params]
    opt = Shampoo(params, lr=1e-2, max_precond_dim=8, eps=1e-8)
    adam = torch.optim.Adam(copies, lr=1e-2, betas=(0.95, 0.95), eps=1e-8)
    for _ in range(10):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        opt.step()
        adam.step()
        for p, q in zip(params, copies):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("exponent", [-0.25, -0.5])
def test_preconditioners_are_damped_inverse_roots(exponent):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    eps = 1e-3
    opt = Shampoo([p], eps=eps, exponent=exponent, precondition_frequency=3)
    for _ in range(7):  # recomputed at step 7 from the factors of step 7
        p.grad = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        opt.step()
    state = opt.state[p]
    for factor, root in zip(state["GG"], state["precond"]):
        damped = factor + eps * torch.eye(len(factor), dtype=torch.float64)
        torch.testing.assert_close(root, root.T)
        identity = torch.linalg.matrix_power(root, round(-1 / exponent)) @ damped
        torch.testing.assert_close(identity, torch.eye(len(factor), dtype=torch.float64))


def test_beats_adam_on_rotated_quadratic():
    lrs = [10 ** (-k / 4) for k in range(6, 12)]  # 10^-1.5 ... 10^-2.75, tuned for each
    adam = adamw_best_steps(lrs, max_steps=1000)
    shampoo = best_steps(lambda p, lr: Shampoo(p, lr=lr), lrs, max_steps=300)
    shampoo2 = best_steps(lambda p, lr: Shampoo(p, lr=lr, exponent=-0.5), lrs, max_steps=300)
    # Measured: AdamW 920 steps, Shampoo 223, Shampoo^2 (exponent -1/2) 168.
    assert adam > 600
    assert shampoo < 300 and shampoo2 < 300
    assert max(shampoo, shampoo2) < adam / 3


def test_state_dict_round_trip_continues_bit_for_bit():
    group_a, group_b = make_params()
    opt = make_optimizer(group_a, group_b, exponent=-0.5)
    for t in range(7):  # roots recomputed at steps 1 and 5
        set_grads(group_a, group_b, t)
        opt.step()

    resumed, fresh_a, fresh_b = resume_from_state_dict(opt, group_a, group_b, make_optimizer)
    # the exponent comes from the state dict

    for t in range(7, 18):  # crosses the recomputations at steps 9, 13 and 17
        set_grads(group_a, group_b, t)
        set_grads(fresh_a, fresh_b, t)
        opt.step()
        resumed.step()
    assert_all_equal(group_a + group_b, fresh_a + fresh_b)


def test_bf16_params_keep_fp32_state():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=gen).bfloat16()
    start = p.clone()
    opt = Shampoo([p], lr=1e-2, precondition_frequency=2)
    for _ in range(4):
        p.grad = torch.randn(6, 4, generator=gen).bfloat16()
        opt.step()
    assert p.dtype == torch.bfloat16 and not torch.equal(p, start)
    state = opt.state[p]
    tensors = [state["exp_avg"], state["exp_avg_sq"], *state["GG"], *state["precond"]]
    assert all(t.dtype == torch.float32 for t in tensors)

    fresh = p.clone()
    resumed = Shampoo([fresh])
    resumed.load_state_dict(opt.state_dict())
    loaded = resumed.state[fresh]
    assert all(t.dtype == torch.float32 for t in [loaded["exp_avg"], *loaded["precond"]])
    assert torch.equal(loaded["exp_avg_sq"], state["exp_avg_sq"])


@pytest.mark.parametrize(
    "kwargs, name, bad_value",
    [
        ({"lr": -1e-3}, "lr", "-0.001"),
        ({"betas": (-0.1, 0.99)}, "betas", "-0.1"),
        ({"betas": (0.9, 1.0)}, "betas", "1.0"),
        ({"betas": (0.9,)}, "betas", "(0.9,)"),
        ({"shampoo_beta": 1.0}, "shampoo_beta", "1.0"),
        ({"eps": 0.0}, "eps", "0.0"),
        ({"weight_decay": -0.1}, "weight_decay", "-0.1"),
        ({"precondition_frequency": 0}, "precondition_frequency", "0"),
        ({"max_precond_dim": 0}, "max_precond_dim", "0"),
        ({"exponent": 0.25}, "exponent", "0.25"),
        ({"grafting": "sgd"}, "grafting", "sgd"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name, bad_value):
    assert_invalid_hyperparameter_raises(
        functools.partial(Shampoo, [torch.zeros(2)]), kwargs, name, bad_value
    )


def test_step_returns_closure_loss():
    p, loss = closure_step(Shampoo, lr=0.1)
    assert loss.item() == 3.0
    assert torch.allclose(p.detach(), torch.full((3,), 0.1))  # Adam's first step is lr * sign
