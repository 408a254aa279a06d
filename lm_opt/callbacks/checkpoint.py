"""`last.ckpt` on the schedule the run sets, from its first step; `best.ckpt` at each validation."""

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def end_of_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether the micro-batch `batch_idx` closed an optimizer step: a checkpoint taken inside a
    gradient accumulation would lose the gradients of its first micro-batches."""
    return batch_idx % trainer.accumulate_grad_batches == trainer.accumulate_grad_batches - 1


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with its two files on two clocks.

    `last.ckpt`, what `fit --ckpt_path last` resumes from, is written every `every_n_train_steps`
    optimizer steps or every `train_time_interval`, from the first step, whether or not validation
    has run, and after every validation; `lm_opt.callbacks.preemption` writes it when the run is
    signalled. Lightning 2.6 defers every save, `last` too, until the monitored metric exists, so
    with `monitor: val/loss` a run kept nothing before its first validation, whatever its schedule.

    The top-k file (`best.ckpt`) is written at the end of each validation only, with the weights
    that validation scored: on Lightning's step schedule it would pair the last validation's loss
    with the weights of a later step.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.last_step_saved: int | None = None
        self.flush_events = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The loggers write a step's loss after its on_train_batch_end, where last.ckpt was saved:
        # flushed here, the events of every step a checkpoint holds are on disk before the next
        # step trains, so a killed and resumed run's record has no gap.
        if self.flush_events:
            for logger in trainer.loggers:
                logger.save()
            self.flush_events = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not end_of_step(trainer, batch_idx) or trainer.fast_dev_run or trainer.sanity_checking:
            return
        if self.due(trainer):
            self.write_last(trainer)

    def due(self, trainer: L.Trainer) -> bool:
        """Whether the schedule asks for `last.ckpt` at this step; the same answer on every rank."""
        by_steps = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if self._train_time_interval is None:
            return by_steps
        now = time.monotonic()
        by_time = (self._last_time_checked is not None
                   and now - self._last_time_checked >= self._train_time_interval.total_seconds())
        by_time = trainer.strategy.broadcast(by_time)  # the ranks' clocks differ; rank 0's decides
        if by_time or by_steps:
            self._last_time_checked = now
        return by_steps or by_time

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        # Again after validation, even at a step already saved: the loops' state then says that
        # this step's validation is done, so a resumed run does not skip or repeat it.
        self.last_step_saved = None
        self.write_last(trainer)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write `last.ckpt` of this step (on every rank: saving is collective), unless it holds it."""
        if not self.save_last or self.last_step_saved == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self.last_step_saved = trainer.global_step
        self.flush_events = True
