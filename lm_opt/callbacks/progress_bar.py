"""A progress bar in optimizer steps, with tokens/s and the latest validation loss."""

import sys
import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """`step 120/300`, the training loss, tokens/s and the latest validation loss.

    Runs are step-based (trainer.max_steps, one endless epoch), so Lightning's bar, which counts
    epochs (`Epoch 0/-2`), says nothing. Tokens/s is measured over the last `window` steps, with
    the time spent validating left out. The bar reads the loss (a host sync) once every
    `refresh_rate` optimizer steps, never on the micro-batches of gradient accumulation.
    """

    def __init__(self, refresh_rate: int = 1, window: int = 20):
        super().__init__(refresh_rate=refresh_rate)
        self.times: deque[tuple[float, int]] = deque(maxlen=window)
        self.tokens_per_s: float | None = None
        self.seen_step = -1

    def init_train_tqdm(self) -> Tqdm:
        # Created when training starts, after a resumed run has restored its step.
        return Tqdm(desc="step", total=self.trainer.max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0,
                    bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.seen_step = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # the one endless epoch: Lightning's bar would restart its count (of batches) here

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self.seen_step:
            return  # another micro-batch of the same optimizer step
        self.seen_step = step
        self.times.append((time.monotonic(), step))
        bar = self.train_progress_bar
        if self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.clear()
        super().on_validation_end(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        shown = {short: metrics[key] for key, short in (("train/loss", "loss"), ("val/loss", "val_loss"))
                 if key in metrics}
        if len(self.times) > 1 and hasattr(pl_module, "tokens_per_step"):
            (t0, s0), (t1, s1) = self.times[0], self.times[-1]
            self.tokens_per_s = (s1 - s0) * pl_module.tokens_per_step() / max(t1 - t0, 1e-9)
        if self.tokens_per_s is not None:
            shown["tok/s"] = f"{self.tokens_per_s:,.0f}"
        return shown
