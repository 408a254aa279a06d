"""The length of training as a sweep axis: each length a line of its own, its validation and
checkpoint intervals scaled to it, its warmup a fraction of it."""

import pytest
import yaml

from lm_opt.schedule import lr_factor
from lm_opt.study import sweep_plan

TINY = {"data.seq_len": 32, "data.batch_size": 4, "data.val_sequences": 8, "data.num_workers": 0,
        "model.preset": "tiny", "trainer.max_steps": 200, "trainer.val_check_interval": 50,
        "checkpoint.every_n_train_steps": 25, "model.warmup": 0.1, "trainer.enable_progress_bar": False}


def write_spec(tmp_path, grid=None, **overrides):
    spec = {"name": "horizon", "out_dir": str(tmp_path / "out"), "base": ["configs/quickstart.yaml"],
            "optimizers": {"adamw": {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-3, 1e-2]}}},
            "grid": grid or {"trainer.max_steps": [50, 800]}, "overrides": {**TINY, **overrides}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def option(point, key):
    return point.overrides[point.overrides.index(f"--{key}") + 1]


@pytest.mark.slow
def test_each_length_scales_its_validation_and_checkpoint_intervals_and_is_a_line_of_its_own(tmp_path):
    points = sweep_plan.plan(sweep_plan.load_spec(write_spec(tmp_path)))
    assert [p.name for p in points] == ["adamw_lr1.00e-03_max_steps50", "adamw_lr0.01_max_steps50",
                                        "adamw_lr1.00e-03_max_steps800", "adamw_lr0.01_max_steps800"]
    short, long = points[0], points[2]
    assert [option(short, k) for k in ("trainer.max_steps", "trainer.val_check_interval",
                                       "checkpoint.every_n_train_steps")] == ["50", "12", "6"]
    assert [option(long, k) for k in ("trainer.max_steps", "trainer.val_check_interval",
                                      "checkpoint.every_n_train_steps")] == ["800", "200", "100"]
    assert sweep_plan.line_of(short) != sweep_plan.line_of(long)
    resolved = sweep_plan.validate(long)  # the CLI reads the scaled values back as given
    assert resolved["trainer"]["val_check_interval"] == 200 and resolved["checkpoint"]["every_n_train_steps"] == 100


def test_the_warmup_fraction_warms_each_length_over_its_own_tenth():
    for steps in (50, 800):
        ramp = [lr_factor(s, steps, warmup=0.1) for s in range(steps)]
        peak = ramp.index(max(ramp))
        assert peak == steps // 10 and ramp[0] == pytest.approx(0.1)


@pytest.mark.parametrize("change,message", [
    ({"grid": {"trainer.max_steps": [50, 80.5]}}, "the lengths swept need positive integers"),
    ({"checkpoint.every_n_train_steps": None}, "overrides.checkpoint.every_n_train_steps: a spec that sweeps"),
    ({"trainer.val_check_interval": 0.5}, "overrides.trainer.val_check_interval: a spec that sweeps"),
    ({"model.warmup": 20}, "needs the warmup as a fraction"),
])
def test_a_length_sweep_without_a_scalable_reference_is_refused(tmp_path, change, message):
    overrides = {k: v for k, v in change.items() if k != "grid"}
    with pytest.raises(sweep_plan.SpecError, match=message):
        sweep_plan.load_spec(write_spec(tmp_path, change.get("grid"), **overrides))


def test_a_length_in_an_optimizers_own_grid_is_refused(tmp_path):
    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["optimizers"]["adamw"]["grid"]["trainer.max_steps"] = spec.pop("grid")["trainer.max_steps"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(sweep_plan.SpecError, match="sweep the length in the shared `grid`"):
        sweep_plan.load_spec(path)


def test_a_length_in_an_optimizers_overrides_is_scaled_too(tmp_path):
    """One label per length, each with its own lr grid (a ladder): intervals scale as on a shared axis."""
    path = write_spec(tmp_path)
    spec = yaml.safe_load(path.read_text())
    del spec["grid"]
    spec["optimizers"]["adamw_steps3200"] = {"config": "configs/optim/adamw.yaml", "grid": {"lr": [1e-3]},
                                             "overrides": {"trainer.max_steps": 3200}}
    path.write_text(yaml.safe_dump(spec))
    points = {p.name: p for p in sweep_plan.plan(sweep_plan.load_spec(path))}
    assert option(points["adamw_lr0.01"], "trainer.val_check_interval") == "50"
    long = points["adamw_steps3200_lr1.00e-03"]
    assert [option(long, "trainer.val_check_interval"), option(long, "checkpoint.every_n_train_steps")] == ["800", "400"]
