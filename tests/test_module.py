"""What the LightningModule logs, and how it prepares the model."""

from cli_helpers import scalars, summary, tiny_args, fit


def test_tokens_seen_are_logged_at_the_logging_steps_beside_the_loss(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4, "--trainer.log_every_n_steps", "2", "--trainer.accumulate_grad_batches", "2"))
    tokens_per_step = summary(tmp_path / "run")["tokens"] // 4
    assert tokens_per_step == 2 * 4 * 32
    loss_steps = set(scalars(tmp_path / "run", "train/loss"))
    assert scalars(tmp_path / "run", "train/tokens") == {1: 2 * tokens_per_step, 3: 4 * tokens_per_step}
    assert loss_steps == {1, 3}


def test_fused_adamw_trains_under_bf16_mixed_with_gradient_clipping(tmp_path):
    """Lightning refuses to clip for a fused optimizer under mixed precision (fp16's scaler);
    the study configs run fused AdamW under bf16-mixed with clipping at 1."""
    fit(*tiny_args(tmp_path, "run", 2, "--config", "configs/optim/adamw.yaml", "--trainer.precision", "bf16-mixed",
                   "--trainer.gradient_clip_val", "1.0"))
    assert summary(tmp_path / "run")["status"] == "finished"
