"""Divergence as a result: stop the run, record it, keep the last good checkpoint."""

import math
from typing import Any

import lightning as L
import torch

from lm_opt.errors import UserError


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
    the run record writes `status: diverged` with the step to its summary.

    The host reads the loss only every `check_every_n_steps` optimizer steps: in between, the
    worst micro-batch loss is kept on the device (NaN wins), so no step waits on a device sync.
    That worst loss is the real one (Lightning hands callbacks the loss divided by the gradient
    accumulation) and the maximum over ranks, so every rank stops at the same step.
    """

    def __init__(self, max_ratio: float = 3.0, ignore_first: int = 0, check_every_n_steps: int = 1):
        """
        Args:
            max_ratio: A loss above `max_ratio` x the first step's loss counts as diverged.
            ignore_first: Steps at the start that are never judged (a noisy warmup).
            check_every_n_steps: Read the worst loss on the host every this many optimizer steps
                (one device sync each); a run diverges at the first check after its loss did.
        """
        if max_ratio <= 1:
            raise UserError(f"divergence.max_ratio must be > 1, got {max_ratio}")
        if check_every_n_steps < 1:
            raise UserError(f"divergence.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.max_ratio = max_ratio
        self.ignore_first = ignore_first
        self.check_every_n_steps = check_every_n_steps
        self.initial_loss: float | None = None
        self.worst: torch.Tensor | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        loss = loss.detach().float() * trainer.accumulate_grad_batches
        self.worst = loss if self.worst is None else torch.maximum(self.worst, loss)  # NaN propagates
        step = trainer.global_step  # optimizer steps taken, after this micro-batch
        first = self.initial_loss is None
        if not first and (step % self.check_every_n_steps or batch_idx % trainer.accumulate_grad_batches
                          != trainer.accumulate_grad_batches - 1):
            return
        worst = trainer.strategy.reduce(self.worst, reduce_op="max").item()
        self.worst = None
        if first:
            self.initial_loss = worst
            return
        if step > self.ignore_first and (not math.isfinite(worst) or worst > self.max_ratio * self.initial_loss):
            raise Diverged({"status": "diverged", "diverged_at_step": step, "loss": worst,
                            "initial_loss": self.initial_loss})

    def state_dict(self) -> dict[str, Any]:
        return {"initial_loss": self.initial_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_loss = state_dict["initial_loss"]
