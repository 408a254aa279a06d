"""Harness code shared by the optimizer tests.

Only plumbing lives here (running steps, saving and resuming, comparing runs); each test
file keeps its own plain reference loop of its optimizer's equations.
"""

import contextlib
import copy
import functools
import io
import math

import pytest
import torch
import torch.distributed as dist


def random_params(shapes, gen, dtype):
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def run_seeded(set_grads, opt, group_a, group_b, n_steps, seed=1):
    """``n_steps`` steps, gradients from ``set_grads(group_a, group_b, gen)`` with a seeded gen."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        set_grads(group_a, group_b, gen)
        opt.step()


def run_scheduled(opt, params, grad_steps, base_lrs, lr_factor, first_step=1):
    """One step per entry of ``grad_steps``, with group["lr"] = base * lr_factor(t)."""
    for t, grads in enumerate(grad_steps, start=first_step):
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_factor(t)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()


def assert_all_equal(params, others):
    params, others = list(params), list(others)
    assert len(params) == len(others)
    for p, q in zip(params, others):
        assert torch.equal(p, q)


def assert_foreach_equals_per_tensor(run_with):
    """``run_with(foreach)`` runs an optimizer, returns its parameters; both runs agree bitwise."""
    assert_all_equal(run_with(False), run_with(True))


def resume_from_state_dict(opt, group_a, group_b, make_optimizer):
    """Save ``opt``'s state dict through torch.save, and load it into
    ``make_optimizer(fresh_a, fresh_b)`` over deep copies of the parameters.

    Returns (resumed, fresh_a, fresh_b).
    """
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    fresh_a, fresh_b = [copy.deepcopy(p) for p in group_a], [copy.deepcopy(p) for p in group_b]
    resumed = make_optimizer(fresh_a, fresh_b)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    return resumed, fresh_a, fresh_b


def assert_invalid_hyperparameter_raises(make, kwargs, match, bad_value=None):
    """``make(**kwargs)`` raises ValueError matching ``match`` (naming ``bad_value`` if given)."""
    with pytest.raises(ValueError, match=match) as info:
        make(**kwargs)
    if bad_value is not None:
        assert bad_value in str(info.value)


def closure_step(cls, **kwargs):
    """One step of ``cls([p], **kwargs)`` on (p - 1)^2 from p = 0; returns (p, loss)."""
    p = torch.zeros(3, requires_grad=True)
    opt = cls([p], **kwargs)

    def closure():
        opt.zero_grad()
        loss = (p - 1).square().sum()
        loss.backward()
        return loss

    return p, opt.step(closure)


@contextlib.contextmanager
def single_rank_mesh():
    """A 1-rank CPU device mesh, in a gloo process group made for it unless one exists."""
    from torch.distributed.device_mesh import init_device_mesh

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if owns_group:
            dist.destroy_process_group()


def unfold(x, i):
    """Mode-i unfolding: dim i as rows, every other dim flattened into columns."""
    return x.movedim(i, 0).reshape(x.shape[i], -1)


def mode_product(x, mat, i):
    """``x`` with its dim i multiplied by ``mat`` (``mat @ unfold(x, i)``, folded back)."""
    rest = [s for j, s in enumerate(x.shape) if j != i]
    return (mat @ unfold(x, i)).reshape(mat.shape[0], *rest).movedim(0, i)


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
    """Fewest steps to the target on the rotated quadratic over ``lrs`` (best not at an edge)."""
    a, b, w0 = rotated_quadratic()
    counts = {
        lr: steps_to_target(functools.partial(make_opt, lr=lr), a, b, w0, max_steps) for lr in lrs
    }
    reached = {lr: c for lr, c in counts.items() if c is not None}
    best_lr = min(reached, key=reached.get)
    assert best_lr not in (lrs[0], lrs[-1]), f"best lr {best_lr} at the edge of the grid"
    return reached[best_lr]


def adamw_best_steps(lrs, max_steps=1000):
    return best_steps(
        lambda p, lr: torch.optim.AdamW(p, lr=lr, betas=(0.95, 0.95), weight_decay=0.0),
        lrs,
        max_steps=max_steps,
    )
