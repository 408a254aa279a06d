import pytest
import torch

from lm_opt.optim import EMASGD


def test_matches_bias_corrected_ema_momentum_equations():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=gen))
    q = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=gen))
    untouched = torch.nn.Parameter(torch.randn(2, dtype=torch.float64, generator=gen))
    opt = EMASGD([{"params": [p, untouched]}, {"params": [q], "lr": 0.3}], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = {"p": (p.detach().clone(), torch.zeros_like(p), 0.1), "q": (q.detach().clone(), torch.zeros_like(q), 0.3)}
    start = untouched.detach().clone()
    for t in range(1, 26):
        grads = {"p": torch.randn(4, 3, dtype=torch.float64, generator=gen), "q": torch.randn(5, dtype=torch.float64, generator=gen)}
        if t == 3:
            grads["q"] = torch.zeros(5, dtype=torch.float64)
        p.grad, q.grad = grads["p"], grads["q"]
        opt.step()
        for key, (w, m, lr) in ref.items():
            m.mul_(0.9).add_(0.1 * grads[key])
            w.mul_(1 - lr * 0.01).sub_(lr * m / (1 - 0.9**t))
        torch.testing.assert_close(p.detach(), ref["p"][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(q.detach(), ref["q"][0], rtol=1e-6, atol=0)
    assert torch.equal(untouched.detach(), start) and untouched not in opt.state


def test_state_dict_round_trip_continues_bit_for_bit():
    def run(n, opt_state=None, weights=None):
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(weights.clone() if weights is not None else torch.ones(3, 2))
        opt = EMASGD([p], lr=0.05)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        grads = [torch.randn(3, 2, generator=gen) for _ in range(10)]
        for g in grads[10 - n:] if opt_state is not None else grads[:n]:
            p.grad = g
            opt.step()
        return p.detach(), opt.state_dict()

    full, _ = run(10)
    half, state = run(5)
    resumed, _ = run(5, state, half)
    assert torch.equal(full, resumed)


@pytest.mark.parametrize("kwargs,name", [({"lr": -1}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1}, "weight_decay")])
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EMASGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def _run_mixed(foreach, n_steps=12, opt_state=None):
    """A bf16, an fp32 and an fp64 tensor; the fp64 one skips a step (own bias correction)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=gen).bfloat16(), torch.randn(5, generator=gen),
              torch.randn(2, 2, generator=gen, dtype=torch.float64)]
    opt = EMASGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.3}], lr=0.1, weight_decay=0.01,
                 foreach=foreach)
    for t in range(n_steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if t == 2:
            params[2].grad = None
        opt.step()
    return params, opt


def test_foreach_equals_per_tensor():
    (a, opt_a), (b, _) = _run_mixed(False), _run_mixed(True)
    assert opt_a.state[a[2]]["step"] == 11
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_bf16_params_keep_fp32_state_through_load():
    params, opt = _run_mixed(True, n_steps=3)
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32
    fresh = [p.clone() for p in params]
    resumed = EMASGD([{"params": fresh[:2]}, {"params": fresh[2:]}], foreach=True)
    resumed.load_state_dict(opt.state_dict())
    assert torch.equal(resumed.state[fresh[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    assert resumed.state[fresh[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.slow
def test_fused_matches_foreach():
    """The compiled step agrees with the eager one up to rounding, bf16 parameters included."""

    def run_with(**kwargs):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen).bfloat16(), torch.randn(2, 2, generator=gen)]
        opt = EMASGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.3}], lr=0.1, weight_decay=0.01, **kwargs)
        for t in range(10):
            opt.param_groups[0]["lr"] = 0.1 / (1 + t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            params[2].grad = None if t == 3 else params[2].grad  # a skipped step: its own bias correction
            opt.step()
        return params

    for p, q in zip(run_with(fused=True), run_with(foreach=True)):
        torch.testing.assert_close(p, q)
