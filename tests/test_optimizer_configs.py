"""Every shipped optimizer setup trains the tiny preset, and the schedule scales each route."""

import math
from pathlib import Path

import pytest

from cli_helpers import fit, optim_config, scalars, summary, tiny_args
from lm_opt.schedule import lr_factor

OPTIM_CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "optim").glob("*.yaml"))


# Frozen Adalayer's 1000 accumulation steps lengthen any run: it has its own test below.
@pytest.mark.parametrize("config", [c for c in OPTIM_CONFIGS if c.stem != "frozen_adalayer"], ids=lambda p: p.stem)
def test_optimizer_config_trains_the_tiny_preset(tmp_path, config):
    fit(*tiny_args(tmp_path, config.stem, 3, "--config", str(optim_config(config, tmp_path))))
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


def test_frozen_adalayer_trains_max_steps_after_its_accumulation_phase(tmp_path):
    """The study's Frozen Adalayer runs 1000 steps at lr 0, then the full 25000 (`max_duration: 26000`)."""
    frozen = Path(tmp_path / "frozen.yaml")
    frozen.write_text(Path("configs/optim/frozen_adalayer.yaml").read_text().replace("freeze_after: 1000", "freeze_after: 2"))
    fit(*tiny_args(tmp_path, "frozen", 4, "--config", str(frozen), "--trainer.val_check_interval", "2"))
    s = summary(tmp_path / "frozen")
    assert s["status"] == "finished" and s["steps"] == 2 + 4
    lrs = scalars(tmp_path / "frozen", "lr-CompositeOptimizer/body (frozen)/matrix/blocks=tensor")
    assert [lrs[step] for step in range(6)][:2] == [0.0, 0.0] and all(lrs[step] > 0 for step in range(2, 6))
