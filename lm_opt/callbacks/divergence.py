"""Divergence as a result: stop the run, record it, keep the last good checkpoint."""

import math
from typing import Any

import lightning as L
import torch


class Diverged(Exception):
    """Raised to end a diverged run; `python -m lm_opt` turns it into a clean exit with status 0."""

    def __init__(self, status: dict[str, Any]):
        super().__init__(f"training loss {status['loss']:.4g} at step {status['diverged_at_step']} "
                         f"(first loss {status['initial_loss']:.4g})")
        self.status = status


class DivergenceStop(L.Callback):
    """Ends a run whose training loss is NaN/Inf or above `max_ratio` times its first value.

    The run ends by raising `Diverged` rather than by `trainer.should_stop`: Lightning then
    saves no checkpoint of the diverged weights, so `last.ckpt` stays the last good one, and
    the run record writes `status: diverged` with the step to `summary.json`. The loss is
    averaged across ranks first, so every rank stops at the same step.
    """

    def __init__(self, max_ratio: float = 3.0, ignore_first: int = 0):
        """
        Args:
            max_ratio: A loss above `max_ratio` x the first step's loss counts as diverged.
            ignore_first: Steps at the start that are never judged (a noisy warmup).
        """
        if max_ratio <= 1:
            raise ValueError(f"DivergenceStop.max_ratio must be > 1, got {max_ratio}")
        self.max_ratio = max_ratio
        self.ignore_first = ignore_first
        self.initial_loss: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean").item()
        if self.initial_loss is None:
            self.initial_loss = loss
        step = trainer.global_step
        if step <= self.ignore_first:
            return
        if not math.isfinite(loss) or loss > self.max_ratio * self.initial_loss:
            raise Diverged({"status": "diverged", "diverged_at_step": step, "loss": loss,
                            "initial_loss": self.initial_loss})

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = state_dict["initial_loss"]
