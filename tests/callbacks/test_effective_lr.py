"""Effective-lr quantiles logged during a run equal a direct computation from optimizer state."""

import numpy as np
import pytest
import torch

from cli_helpers import fit, scalars, tiny_args
from lm_opt.callbacks.effective_lr import QUANTILES, quantiles


def direct_effective_lr(state: dict, group: dict) -> np.ndarray:
    """lr / (sqrt(v / (1 - beta2^t)) + eps), the study's definition, from a checkpoint's state."""
    v = state["exp_avg_sq"].double().numpy()
    t = float(state["step"])
    return group["lr"] / (np.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"])


@pytest.mark.parametrize("optimizer,name", [("adamw", "blocks.0.mlp.fc.weight"), ("adalayer", "lm_head.weight")])
def test_logged_quantiles_equal_a_direct_computation_from_state(tmp_path, optimizer, name):
    constant_lr = ("--model.warmup", "0", "--model.min_lr_ratio", "1.0")
    fit(*tiny_args(tmp_path, optimizer, 3, "--config", f"configs/optim/{optimizer}.yaml", *constant_lr,
                   "--eff_lr.every_n_steps", "3"))
    checkpoint = torch.load(tmp_path / optimizer / "checkpoints" / "last.ckpt", weights_only=False)
    optimizer_state = checkpoint["optimizer_states"][0]
    groups = optimizer_state.get("optimizers", [optimizer_state])[0]["param_groups"]
    group = next(g for g in groups if name in g["param_names"])
    index = group["params"][group["param_names"].index(name)]
    state = optimizer_state.get("optimizers", [optimizer_state])[0]["state"][index]
    eff = direct_effective_lr(state, group)
    if optimizer == "adalayer":
        assert eff.shape == (checkpoint["state_dict"]["model.lm_head.weight"].shape[0],), "one value per logit"
    expected = np.quantile(eff, QUANTILES, method="nearest")
    for q, value in zip(QUANTILES, expected):
        logged = scalars(tmp_path / optimizer, f"eff_lr/{name}/q{round(q * 100)}")
        assert list(logged) == [2]  # logged once, after the third step (global step index 2)
        assert logged[2] == pytest.approx(value, rel=1e-5)


def test_quantiles_are_nearest_rank():
    x = torch.arange(101.0).flip(0)
    assert quantiles(x).tolist() == [0, 5, 25, 50, 75, 95, 100]
