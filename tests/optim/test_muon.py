"""Muon against torch.optim.Muon (the reference it reimplements) and against what Newton-Schulz is for."""

import functools

import pytest
import torch

from lm_opt.optim import Muon
from lm_opt.optim.muon import newton_schulz
from optim_harness import assert_all_equal, assert_invalid_hyperparameter_raises, resume_from_state_dict

SHAPES = [(16, 8), (8, 24), (12, 12)]  # tall, wide, square: the transposition and the lr adjustment


def run(make, dtype, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
    optimizer = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_equals_torch_muon_bit_for_bit(dtype, nesterov, adjust_lr_fn):
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, _ = run(lambda ps: Muon(ps, **kwargs), dtype, steps=6)
    theirs, _ = run(lambda ps: torch.optim.Muon(ps, **kwargs), dtype, steps=6)
    assert_all_equal(ours, theirs)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (256, 64)])
def test_newton_schulz_gives_the_singular_vectors_with_singular_values_near_one(shape):
    """For G = U S V^T, NS(G) ~ U f(S) V^T with f(S) in about [0.7, 1.2] (rectangular Gaussians
    have no singular value near 0)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g, (3.4445, -4.7750, 2.0315), steps=5, eps=1e-7).double()
    assert x.shape == g.shape
    in_basis = u.T @ x @ vh.T
    off = in_basis - torch.diag(in_basis.diagonal())
    assert off.abs().max() < 0.05  # bfloat16 rounding, not another basis
    assert 0.6 < in_basis.diagonal().min() and in_basis.diagonal().max() < 1.25


def test_one_step_is_the_equation():
    """W <- (1 - lr wd) W - lr sqrt(max(1, A/B)) NS((1 - mu) g + mu B), B = (1 - mu) g from zero."""
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
    p = torch.nn.Parameter(w.clone())
    p.grad = g.clone()
    Muon([p], lr=0.02, weight_decay=0.1, momentum=0.9).step()
    lookahead = 0.1 * g + 0.9 * (0.1 * g)
    expected = w * (1 - 0.02 * 0.1) - 0.02 * 2**0.5 * newton_schulz(lookahead, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_state_dict_round_trip_continues_bit_for_bit():
    make = functools.partial(Muon, lr=0.02, weight_decay=0.1)
    params, optimizer = run(lambda ps: make(ps), torch.float32, steps=3)
    resumed, fresh, _ = resume_from_state_dict(optimizer, params, [], lambda a, b: make(a + b))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q in zip(params, fresh):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        optimizer.step()
        resumed.step()
    assert_all_equal(params, fresh)


def test_bf16_params_keep_fp32_momentum_and_round_once():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(8, 4, generator=gen).bfloat16()
    start = p.float()
    p.grad = torch.randn(8, 4, generator=gen).bfloat16()
    opt = Muon([p], lr=0.02, weight_decay=0.0, momentum=0.9, nesterov=False)
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.float32
    update = newton_schulz(0.1 * p.grad.float(), (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert torch.equal(p, (start - 0.02 * 2**0.5 * update).bfloat16())


@pytest.mark.parametrize(
    "kwargs, name",
    [({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"eps": 0.0}, "eps"), ({"ns_steps": 0}, "ns_steps"), ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
     ({"adjust_lr_fn": "spectral"}, "adjust_lr_fn")],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    assert_invalid_hyperparameter_raises(functools.partial(Muon, [torch.zeros(2, 2)]), kwargs, name)


def test_refuses_tensors_that_are_not_matrices_naming_the_shape():
    with pytest.raises(ValueError, match=r"2-D.*\(8,\)"):
        Muon([torch.zeros(2, 2), torch.zeros(8)])
