"""Every shipped optimizer setup trains the tiny preset, and the schedule scales each route."""

import math
from pathlib import Path

import pytest

from cli_helpers import fit, scalars, summary, tiny_args
from lm_opt.schedule import lr_factor

OPTIM_CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "optim").glob("*.yaml"))


@pytest.mark.parametrize("config", OPTIM_CONFIGS, ids=lambda p: p.stem)
def test_optimizer_config_trains_the_tiny_preset(tmp_path, config):
    fit(*tiny_args(tmp_path, config.stem, 3, "--config", str(config)))
    s = summary(tmp_path / config.stem)
    assert s["status"] == "finished" and s["steps"] == 3
    losses = scalars(tmp_path / config.stem, "train/loss")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())


def test_each_route_follows_the_schedule_from_its_own_base_lr(tmp_path):
    steps = 10
    fit(*tiny_args(tmp_path, "routes", steps, "--config", "configs/optim/sgd_adalayer_last_norm.yaml",
                   "--model.warmup", "0.3"))
    run = tmp_path / "routes"
    for tag, base in [("lr-CompositeOptimizer/last_layer+norm/last_layer/blocks=row", 3.16e-3),
                      ("lr-CompositeOptimizer/body/matrix", 1.0)]:
        logged = scalars(run, tag)
        assert sorted(logged) == list(range(steps))
        for step, lr in logged.items():
            assert lr == pytest.approx(base * lr_factor(step, steps, warmup=0.3, min_ratio=0.1), rel=1e-6)
