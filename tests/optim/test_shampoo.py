import copy
import functools
import io
import math

import pytest
import torch
import torch.distributed as dist

from lm_opt.optim.shampoo import Shampoo

N_STEPS = 25
FREQ = 4  # inverse roots recomputed at steps 1, 5, 9, ..., 25


def unfold(x, i):
    """Mode-i unfolding: dim i as rows, every other dim flattened into columns."""
    return x.movedim(i, 0).reshape(x.shape[i], -1)


def mode_product(x, mat, i):
    """``x`` with its dim i multiplied by ``mat`` (``mat @ unfold(x, i)``, folded back)."""
    rest = [s for j, s in enumerate(x.shape) if j != i]
    return (mat @ unfold(x, i)).reshape(mat.shape[0], *rest).movedim(0, i)


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
    group_a = [torch.randn(s, generator=gen, dtype=dtype) for s in [(6, 6), (7,), (2, 3, 4)]]
    group_b = [torch.randn(s, generator=gen, dtype=dtype) for s in [(12, 6), (4, 4), (5,), (3, 3)]]
    return group_a, group_b


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


def rotated_quadratic(n=16, cond=300.0):
    """f(W) = 0.5 tr(W^T A W B), A and B with eigenvalues 1..cond in random bases.

    The Hessian B (x) A is ill-conditioned along directions no coordinate axis matches;
    W starts with an equal share of the loss on each of its eigendirections.
    """
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    a, b = u @ torch.diag(eig) @ u.T, v @ torch.diag(eig) @ v.T
    coeffs = torch.randn(n, n, generator=gen, dtype=torch.float64) / torch.outer(eig, eig).sqrt()
    return a, b, u @ coeffs @ v.T


def steps_to_target(make_opt, a, b, w0, max_steps, target=1e-3):
    """Steps until f(W) <= target * f(W0), or None."""
    w = w0.clone()
    opt = make_opt([w])
    f0 = 0.5 * torch.trace(w0.T @ a @ w0 @ b)
    for t in range(max_steps):
        w.grad = a @ w @ b
        opt.step()
        loss = 0.5 * torch.trace(w.T @ a @ w @ b)
        if not torch.isfinite(loss):
            return None
        if loss <= target * f0:
            return t + 1
    return None


def best_steps(make_opt, lrs, max_steps):
    a, b, w0 = rotated_quadratic()
    counts = {
        lr: steps_to_target(functools.partial(make_opt, lr=lr), a, b, w0, max_steps) for lr in lrs
    }
    reached = {lr: c for lr, c in counts.items() if c is not None}
    best_lr = min(reached, key=reached.get)
    assert best_lr not in (lrs[0], lrs[-1]), f"best lr {best_lr} at the edge of the grid"
    return reached[best_lr]


def test_beats_adam_on_rotated_quadratic():
    lrs = [10 ** (-k / 4) for k in range(6, 12)]  # 10^-1.5 ... 10^-2.75, tuned for each
    adam = best_steps(
        lambda p, lr: torch.optim.AdamW(p, lr=lr, betas=(0.95, 0.95), weight_decay=0.0),
        lrs,
        max_steps=1000,
    )
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

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    fresh_a, fresh_b = [copy.deepcopy(p) for p in group_a], [copy.deepcopy(p) for p in group_b]
    resumed = make_optimizer(fresh_a, fresh_b)  # the exponent comes from the state dict
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))

    for t in range(7, 18):  # crosses the recomputations at steps 9, 13 and 17
        set_grads(group_a, group_b, t)
        set_grads(fresh_a, fresh_b, t)
        opt.step()
        resumed.step()
    for p, q in zip(group_a + group_b, fresh_a + fresh_b):
        assert torch.equal(p, q)


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
    with pytest.raises(ValueError, match=name) as info:
        Shampoo([torch.zeros(2)], **kwargs)
    assert bad_value in str(info.value)


def test_step_returns_closure_loss():
    p = torch.zeros(3, requires_grad=True)
    opt = Shampoo([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p - 1).square().sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert torch.allclose(p.detach(), torch.full((3,), 0.1))  # Adam's first step is lr * sign


def test_rejects_dtensor():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(RuntimeError, match="Shampoo does not support FSDP/DTensor"):
            Shampoo([sharded])
    finally:
        if owns_group:
            dist.destroy_process_group()
