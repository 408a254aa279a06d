"""The memory extrapolation predicts a measured shape it was not fitted on, and every shipped GPU
config fits an 80 GB GPU by it, so a config change that breaks the fit fails here."""

import pytest
import yaml

from benchmarks.memory import CAPACITY_GIB, CONFIGS, GLOBAL_BATCH, HELD_OUT, activation_bytes, fits, measure, \
    reserved_gib, shipped_runs

TOLERANCE = 0.05  # the stored fit predicts the held-out shape within 0.1% on torch 2.13


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no_ckpt", "ckpt"])
def test_fit_predicts_a_held_out_measured_shape(checkpointing):
    shape, batch_size = HELD_OUT
    measured, _ = measure(shape, batch_size, checkpointing)
    assert activation_bytes(shape, batch_size, checkpointing) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize("name, run", shipped_runs(), ids=[name for name, _ in shipped_runs()])
def test_shipped_config_fits_80_gb_at_the_global_batch(name, run):
    assert fits(run), f"{name}: about {reserved_gib(run):.1f} GiB of {CAPACITY_GIB} (python -m benchmarks.memory)"
    assert run.global_batch == GLOBAL_BATCH


@pytest.mark.parametrize("name", ["150m", "300m", "600m", "1.2b", "ddp", "fsdp"])
def test_validation_runs_every_1000_optimizer_steps(name):
    trainer = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"]
    assert trainer["val_check_interval"] == 1000 * trainer["accumulate_grad_batches"]
