"""`python -m lm_opt fit` end to end on the embedded data: outputs, exact resume, bad input."""

from pathlib import Path

import pytest
import torch

from cli_helpers import fit, scalars, stop_at, summary, tiny_args


def test_fit_writes_tensorboard_events_checkpoint_and_summary(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4))
    run = tmp_path / "run"
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    s = summary(run)
    assert s["status"] == "finished" and s["steps"] == 4
    assert s["tokens"] == 4 * 4 * 32
    assert s["final_val_loss"] is not None and s["best_val_loss"] <= s["final_val_loss"]
    assert s["config"]["model"]["preset"] == "tiny"
    losses = scalars(run, "train/loss")
    assert sorted(losses) == [0, 1, 2, 3]
    assert "val/loss" in {t for t in ("val/loss",) if scalars(run, t)}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_adalayer_last_norm", "soap", "schedule_free"])
def test_resumed_run_gives_identical_losses_at_every_step(tmp_path, optimizer):
    """8 steps straight, against 4 steps (interrupted) resumed from last.ckpt to 8: the data
    position, the optimizer state (routed, eigenbases, Schedule-Free's x and y) and the schedule
    all carry over."""
    common = ("--data.num_workers", "2", "--trainer.val_check_interval", "2",
              "--config", f"configs/optim/{optimizer}.yaml")
    fit(*tiny_args(tmp_path, "full", 8, *common))
    fit(*tiny_args(tmp_path, "half", 8, *common, *stop_at(4)))
    assert summary(tmp_path / "half")["steps"] == 4
    fit(*tiny_args(tmp_path, "half", 8, *common, "--ckpt_path", "last"))
    full, resumed = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "half", "train/loss")
    assert sorted(full) == sorted(resumed) == list(range(8))
    assert [full[s] for s in range(8)] == [resumed[s] for s in range(8)]
    assert summary(tmp_path / "half")["steps"] == 8


@pytest.mark.parametrize(
    "override,message",
    [
        (("--model.preset", "huge"), "unknown model preset 'huge'"),
        (("--model.no_such_key", "1"), "no_such_key"),
        (("--data.batch_size", "0"), "data.batch_size"),
        (("--data.seq_len", "256"), "data.seq_len=256"),
        (("--data.path", "/nonexistent/c4"), "/nonexistent/c4"),
        (("--data.path", "allenai/c4"), "allenai/c4"),
    ],
)
def test_bad_input_fails_before_training_naming_the_key(tmp_path, capsys, override, message):
    with pytest.raises((ValueError, RuntimeError, FileNotFoundError, SystemExit)) as err:
        fit(*tiny_args(tmp_path, "bad", 2, *override))
    text = str(err.value) + capsys.readouterr().err
    assert message in text
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_non_positive_lr_is_rejected_naming_the_route(tmp_path):
    bad = tmp_path / "bad_lr.yaml"
    bad.write_text(Path("configs/optim/adamw.yaml").read_text().replace("lr: 3.16e-3", "lr: -0.1"))
    with pytest.raises(ValueError, match=r"AdamW rejects init_args \{.lr.: -0.1"):
        fit(*tiny_args(tmp_path, "bad", 2, "--config", str(bad)))


def test_corrupt_or_mismatched_checkpoint_is_named(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.ckpt"):
        fit(*tiny_args(tmp_path, "c", 2, "--ckpt_path", str(corrupt)))
    fit(*tiny_args(tmp_path, "small", 2))
    with pytest.raises(ValueError, match="qk_norm"):
        fit(*tiny_args(tmp_path, "other", 2, "--model.qk_norm", "false",
                       "--ckpt_path", str(tmp_path / "small" / "checkpoints" / "last.ckpt")))


def test_no_optimizer_callback_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="OptimizerCallback"):
        fit(*tiny_args(tmp_path, "none", 2, "--trainer.callbacks", "[]"))
