"""last.ckpt follows the run's schedule from the first step, before val/loss exists; best.ckpt holds
the weights a validation scored."""

from pathlib import Path

import lightning as L
import pytest
import torch

from cli_helpers import fit, tiny_args


class LastSteps(L.Callback):
    """Records, before each step trains, the step that checkpoints/last.ckpt holds (None: no file)."""

    seen: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        last = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
        LastSteps.seen.append(torch.load(last, weights_only=False)["global_step"] if last.is_file() else None)


BY_TIME = ("--checkpoint.every_n_train_steps", "null", "--checkpoint.train_time_interval", "0:00:00")


@pytest.mark.parametrize("schedule,expected", [
    (("--checkpoint.every_n_train_steps", "2"), [None, None, 2, 2, 4, 4]),
    (BY_TIME, [None, 1, 2, 3, 4, 5]),  # every step: each is 0 s or more after the last save
])
def test_last_checkpoint_follows_the_schedule_from_the_first_step(tmp_path, schedule, expected):
    LastSteps.seen = []
    fit(*tiny_args(tmp_path, "run", 6, "--trainer.val_check_interval", "6", *schedule,
                   "--trainer.callbacks+=test_checkpoint.LastSteps"))
    assert LastSteps.seen == expected  # validation (val/loss) comes at step 6 only


def test_best_checkpoint_holds_the_weights_its_validation_scored(tmp_path):
    """Saved every step, validated every 3: best.ckpt is of step 3 or 6, never of a step between."""
    fit(*tiny_args(tmp_path, "run", 5, "--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "1"))
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["global_step"] in (3, 5)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
