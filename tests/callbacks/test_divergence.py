import math

import torch

from cli_helpers import fit, summary, tiny_args


def test_a_huge_learning_rate_ends_as_diverged_without_a_crash(tmp_path):
    bad = tmp_path / "huge_lr.yaml"
    bad.write_text(open("configs/optim/sgd.yaml").read().replace("lr: 1.0,", "lr: 1.0e+3,"))
    # Validation every 2 steps leaves a good last.ckpt before the loss explodes.
    fit(*tiny_args(tmp_path, "huge", 12, "--config", str(bad), "--trainer.val_check_interval", "2",
                   "--divergence.max_ratio", "1.5"))
    s = summary(tmp_path / "huge")
    assert s["status"] == "diverged"
    assert 0 < s["diverged_at_step"] < 12 and s["steps"] == s["diverged_at_step"]
    assert not math.isfinite(s["loss"]) or s["loss"] > 1.5 * s["initial_loss"]
    last = torch.load(tmp_path / "huge" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] < s["diverged_at_step"]
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_under_accumulation_the_judged_loss_is_the_real_one_read_every_n_steps(tmp_path):
    bad = tmp_path / "huge_lr.yaml"
    bad.write_text(open("configs/optim/sgd.yaml").read().replace("lr: 1.0,", "lr: 1.0e+3,"))
    fit(*tiny_args(tmp_path, "acc", 12, "--config", str(bad), "--trainer.val_check_interval", "4",
                   "--trainer.accumulate_grad_batches", "2", "--divergence.max_ratio", "1.5",
                   "--divergence.check_every_n_steps", "3"))
    s = summary(tmp_path / "acc")
    assert s["status"] == "diverged" and s["diverged_at_step"] % 3 == 0
    # ln(8100) = 9.0 at initialisation: Lightning's loss divided by the 2 micro-batches would be 4.5
    assert 8.5 < s["initial_loss"] < 9.5
