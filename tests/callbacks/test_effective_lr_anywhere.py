"""The effective lr of optimizers from anywhere: torch's NAdam and RAdam and pytorch-optimizer's,
read from their state (step counter in the state or in the group), against a direct computation
and against the step each really took; a notice for those without one; and an end-to-end run of
pytorch-optimizer classes given by class_path in YAML, logging both diagnostics."""

import json
import logging
import math
from importlib import metadata

import numpy as np
import pytest
import pytorch_optimizer
import torch

from cli_helpers import fit, scalars, tiny_args
from lm_opt.callbacks.effective_lr import QUANTILES, EffectiveLRQuantiles, effective_lrs, second_moment_effective_lr
from lm_opt.optim import Shampoo
from lm_opt.optim.composite import CompositeOptimizer

SHAPE = (6, 5)


def direct(state: dict, group: dict) -> np.ndarray:
    """lr / (sqrt(v / (1 - beta2^t)) + eps), t from the state (torch) or the group (pytorch-optimizer)."""
    t = float(state["step"]) if "step" in state else group["step"]
    v = state["exp_avg_sq"].double().numpy()
    return group["lr"] / (np.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"])


def steps(optimizer_cls, n: int = 6, **kwargs):
    """(t, the step taken, gradient, effective lr after it, optimizer) for n steps of random
    gradients on one float64 tensor."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(SHAPE, generator=gen, dtype=torch.float64))
    opt = optimizer_cls([p], **kwargs)
    for t in range(1, n + 1):
        grad = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        p.grad = grad.clone()
        before = p.detach().clone()
        opt.step()
        yield t, before - p.detach(), grad, second_moment_effective_lr(opt, opt.param_groups[0], p), opt


# Without momentum (beta1 = 0) and weight decay each of these steps by exactly effective_lr * grad.
EXACT = {
    "torch Adam, amsgrad": (torch.optim.Adam, {"lr": 1e-2, "betas": (0.0, 0.95), "amsgrad": True}),
    "torch NAdam": (torch.optim.NAdam, {"lr": 1e-2, "betas": (0.0, 0.95)}),
    "AdEMAMix, alpha 0": (pytorch_optimizer.AdEMAMix, {"lr": 1e-2, "betas": (0.0, 0.95, 0.999), "alpha": 0.0}),
    "Yogi": (pytorch_optimizer.Yogi, {"lr": 1e-2, "betas": (0.0, 0.95)}),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact_where_the_docstring_says_so_the_step_is_effective_lr_times_the_gradient(case):
    cls, kwargs = EXACT[case]
    for t, taken, grad, eff, opt in steps(cls, **kwargs):
        p = opt.param_groups[0]["params"][0]
        state = opt.state[p]
        source = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        expected = direct({**state, "exp_avg_sq": source}, opt.param_groups[0])
        np.testing.assert_allclose(eff.numpy(), expected, rtol=1e-12, err_msg=f"{case} step {t}")
        np.testing.assert_allclose(taken.numpy(), (eff * grad).numpy(), rtol=1e-9, err_msg=f"{case} step {t}")


def test_adam_and_ademamix_with_momentum_step_by_effective_lr_times_their_first_moments():
    for t, taken, _, eff, opt in steps(torch.optim.AdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0):
        state = opt.state[opt.param_groups[0]["params"][0]]
        m_hat = state["exp_avg"] / (1 - 0.9**t)
        np.testing.assert_allclose(taken.numpy(), (eff * m_hat).numpy(), rtol=1e-9)
    for t, taken, _, eff, opt in steps(pytorch_optimizer.AdEMAMix, lr=1e-2, betas=(0.9, 0.95, 0.999), alpha=5.0):
        group = opt.param_groups[0]
        state = opt.state[group["params"][0]]
        assert "step" not in state and group["step"] == t  # pytorch-optimizer counts steps per group
        np.testing.assert_allclose(eff.numpy(), direct(state, group), rtol=1e-12)
        m = state["exp_avg"] / (1 - 0.9**t) + 5.0 * state["exp_avg_slow"]
        np.testing.assert_allclose(taken.numpy(), (eff * m).numpy(), rtol=1e-9)


def test_radam_steps_by_its_rectification_times_the_effective_lr_once_rectified_and_at_lr_before():
    """The documented approximation: r_t lr sqrt(1 - beta2^t) / (sqrt(v) + eps), the effective lr
    times r_t up to where eps sits; while rho_t <= 5 (here the first 5 steps) plain lr * grad."""
    lr, beta2, eps = 1e-2, 0.95, 1e-8
    rho_inf = 2 / (1 - beta2) - 1
    rectified = 0
    for t, taken, grad, eff, opt in steps(torch.optim.RAdam, n=8, lr=lr, betas=(0.0, beta2), eps=eps):
        group = opt.param_groups[0]
        state = opt.state[group["params"][0]]
        np.testing.assert_allclose(eff.numpy(), direct(state, group), rtol=1e-12)
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t <= 5:
            np.testing.assert_allclose(taken.numpy(), lr * grad.numpy(), rtol=1e-12)
            continue
        rectified += 1
        r_t = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        exact = r_t * lr * math.sqrt(1 - beta2**t) / (state["exp_avg_sq"].sqrt() + eps)
        np.testing.assert_allclose(taken.numpy(), (exact * grad).numpy(), rtol=1e-9)
        np.testing.assert_allclose(taken.numpy(), (r_t * eff * grad).numpy(), rtol=1e-6)
        assert r_t < 0.5  # far from the figure this early
    assert rectified == 3


def test_none_before_the_first_step_and_for_prodigys_distance_scaled_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    assert second_moment_effective_lr(opt, opt.param_groups[0], p) is None  # no state yet
    opt = pytorch_optimizer.Prodigy([p])  # D-Adaptation's d scales lr and exp_avg_sq: not Adam's
    p.grad = torch.ones(3)
    opt.step()
    assert "exp_avg_sq" in opt.state[p]
    assert second_moment_effective_lr(opt, opt.param_groups[0], p) is None


def names_of(*params: torch.Tensor) -> dict[int, str]:
    return {id(p): f"p{i}" for i, p in enumerate(params)}


def test_an_optimizer_without_one_gets_one_notice_naming_its_class_and_route(caplog):
    """A route of torch SGD beside AdamW, and a pytorch-optimizer Lion: no eff_lr for their
    parameters, one info line each, however often the quantiles are logged."""
    a, b, c = (torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3))
    routed = CompositeOptimizer([torch.optim.AdamW([{"params": [a], "route": "matrix"}]),
                                 torch.optim.SGD([{"params": [b], "route": "body"}], lr=0.1, momentum=0.9)])
    lion = pytorch_optimizer.Lion([c])
    for p in (a, b, c):
        p.grad = torch.randn(4, 3)
    routed.step()
    lion.step()
    callback = EffectiveLRQuantiles()
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert [name for name, _ in callback.effective_lrs(routed, names_of(a, b))] == ["p0"]
        assert list(callback.effective_lrs(lion, names_of(c))) == []
    notices = [r.getMessage() for r in caplog.records if "exposes no effective lr" in r.getMessage()]
    assert len(notices) == 2, notices
    assert "route 'body': torch.optim.sgd.SGD exposes no effective lr" in notices[0]
    assert "pytorch_optimizer.optimizer.lion.Lion exposes no effective lr" in notices[1]
    assert all("update-size diagnostic" in n for n in notices)


def test_lm_opts_own_optimizers_keep_their_hook_alone():
    """Shampoo's exp_avg_sq is its grafting Adam's: it defines no effective_lr and gets none."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = Shampoo([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    opt.step()
    assert "exp_avg_sq" in opt.state[p]
    assert list(effective_lrs(opt, names_of(p))) == []


# Routes of pytorch-optimizer classes, by class_path: AdEMAMix (Adam-like state, step counted per
# group) on the matrices, Lion (no second moment) on the rest.
THIRD_PARTY = """\
trainer:
  callbacks:
    - class_path: lm_opt.callbacks.OptimizerCallback
      init_args:
        optimizer: null
        routes:
          - roles: [matrix]
            optimizer:
              class_path: pytorch_optimizer.AdEMAMix
              init_args: {lr: 3.0e-3, betas: [0.9, 0.95, 0.999], alpha: 5.0, eps: 1.0e-8}
          - name: rest
            optimizer:
              class_path: pytorch_optimizer.Lion
              init_args: {lr: 3.0e-4, betas: [0.9, 0.99]}
"""


def test_a_pytorch_optimizer_run_by_class_path_logs_effective_lrs_from_its_state_and_update_sizes(tmp_path, caplog):
    """The logged effective lrs against float64 ones from the float32 state the run saved: the
    same entries, a few 1e-7 apart on any CPU kind; rel=1e-5."""
    config = tmp_path / "third_party.yaml"
    config.write_text(THIRD_PARTY)
    constant_lr = ("--model.warmup", "0", "--model.min_lr_ratio", "1.0")
    caplog.set_level(logging.INFO)
    fit(*tiny_args(tmp_path, "third_party", 3, "--config", str(config), *constant_lr, "--eff_lr.every_n_steps", "3"))
    run = tmp_path / "third_party"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    matrices = [g for g in groups if g["route"] == "matrix"]
    assert matrices and all(g["step"] == 3 for g in matrices)
    for group in groups:
        for name, index in zip(group["param_names"], group["params"]):
            if group["route"] != "matrix":
                assert not scalars(run, f"eff_lr/{name}/q50"), name
            else:
                eff = direct(checkpoint["optimizer_states"][0]["state"][index], group)
                expected = np.quantile(eff, QUANTILES, method="nearest")
                for q, value in zip(QUANTILES, expected):
                    assert scalars(run, f"eff_lr/{name}/q{round(q * 100)}") == {2: pytest.approx(value, rel=1e-5)}
            # Every parameter's step size, whichever route took it (the size itself: test_update_size.py).
            assert set(scalars(run, f"update/{name}/rel_norm")) == {2}
            assert set(scalars(run, f"update/{name}/q50")) == {2}
    # The record names the third-party package's version, as it names torch's.
    record = json.loads((run / "summary.json").read_text())["provenance"]
    assert record["optimizer_packages"] == {"pytorch_optimizer": metadata.version("pytorch_optimizer")}
    notices = [r.getMessage() for r in caplog.records if "exposes no effective lr" in r.getMessage()]
    assert notices == ["eff_lr: route 'rest': pytorch_optimizer.optimizer.lion.Lion exposes no effective lr (no "
                       "effective_lr method, no Adam-style exp_avg_sq in its state); the update-size diagnostic "
                       "(update/<parameter>/..., update_size.every_n_steps) covers its steps"]
