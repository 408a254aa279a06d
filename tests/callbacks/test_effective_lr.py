"""Effective-lr quantiles logged during a run equal a direct computation from optimizer state."""

import numpy as np
import pytest
import torch

from cli_helpers import fit, scalars, tiny_args
from lm_opt.callbacks.effective_lr import QUANTILES, partitioned, quantiles, sorted_


def direct_effective_lr(state: dict, group: dict) -> np.ndarray:
    """lr / (sqrt(v / (1 - beta2^t)) + eps), the study's definition, from a checkpoint's state."""
    v = state["exp_avg_sq"].double().numpy()
    t = float(state["step"])
    return group["lr"] / (np.sqrt(v / (1 - group["betas"][1] ** t)) + group["eps"])


@pytest.mark.parametrize("optimizer,name", [("adamw", "blocks.0.mlp.fc.weight"), ("adalayer", "lm_head.weight")])
def test_logged_quantiles_equal_a_direct_computation_from_state(tmp_path, optimizer, name):
    """One run's logged quantiles against float64 ones from the float32 state it saved: the same
    entries, a few 1e-7 apart on any CPU kind (bf16 enters only through that state)."""
    constant_lr = ("--model.warmup", "0", "--model.min_lr_ratio", "1.0")
    fit(*tiny_args(tmp_path, optimizer, 3, "--config", f"configs/optim/{optimizer}.yaml", *constant_lr,
                   "--eff_lr.every_n_steps", "3"))
    checkpoint = torch.load(tmp_path / optimizer / "checkpoints" / "last.ckpt", weights_only=False)
    optimizer_state = checkpoint["optimizer_states"][0]
    groups = optimizer_state["param_groups"]
    group = next(g for g in groups if name in g["param_names"])
    index = group["params"][group["param_names"].index(name)]
    state = optimizer_state["state"][index]
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


@pytest.mark.parametrize("select", [partitioned, sorted_])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_both_selections_give_numpys_nearest_quantiles(select, n):
    flat = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)).float()  # with ties
    ranks = [round(q * (n - 1)) for q in QUANTILES]
    expected = np.quantile(flat.numpy(), QUANTILES, method="nearest")
    assert select(flat, ranks).tolist() == expected.tolist()


def test_fires_once_per_optimizer_step_under_accumulation_with_histograms_counting_every_entry(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(*tiny_args(tmp_path, "accumulate", 3, "--trainer.accumulate_grad_batches", "2",
                   "--trainer.val_check_interval", "6", "--eff_lr.every_n_steps", "1"))
    (events,) = (tmp_path / "accumulate").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    name = "blocks.0.mlp.fc.weight"
    assert [e.step for e in acc.Scalars(f"eff_lr/{name}/q50")] == [0, 1, 2]
    checkpoint = torch.load(tmp_path / "accumulate" / "checkpoints" / "last.ckpt", weights_only=False)
    numel = checkpoint["state_dict"][f"model.{name}"].numel()
    histograms = acc.Histograms(f"eff_lr/{name}")
    assert [h.step for h in histograms] == [0, 1, 2]
    last = histograms[-1].histogram_value
    assert last.num == numel and sum(last.bucket) == numel
    assert last.min == pytest.approx(scalars(tmp_path / "accumulate", f"eff_lr/{name}/q0")[2], rel=1e-6)
