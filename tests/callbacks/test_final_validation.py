"""Every run validates its final weights once, whether or not val_check_interval divides it."""

import pytest

from cli_helpers import events, fit, summary, tiny_args
from lm_opt.cli import LMOptCLI


def test_a_run_the_interval_does_not_divide_validates_its_last_step(tmp_path):
    """The check scores last.ckpt's weights on the same data with the same kernels as the run's
    own final validation, on any CPU kind the same computation: rel=1e-6 is float32's last bits."""
    fit(*tiny_args(tmp_path, "run", 6, "--trainer.val_check_interval", "4"))
    run = tmp_path / "run"
    s = summary(run)
    assert s["steps"] == 6 and s["final_val_step"] == 6
    assert len(events(run, "val/loss")) == 2  # at step 4, and at the end
    # The final loss is that of the final weights, which last.ckpt holds.
    check = LMOptCLI(args=["validate", *tiny_args(tmp_path, "check", 6)[1:],
                           "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert check.trainer.callback_metrics["val/loss"].item() == pytest.approx(s["final_val_loss"], rel=1e-6)


def test_a_run_the_interval_divides_validates_once_at_its_end(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4))
    s = summary(tmp_path / "run")
    assert s["final_val_step"] == 4
    [(_, loss)] = events(tmp_path / "run", "val/loss")
    assert loss == pytest.approx(s["final_val_loss"])
