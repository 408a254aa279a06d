"""The run's record in its log folder: its config when it starts, its summary when it ends
(lm_opt.record reads and writes both)."""

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm_opt import record
from lm_opt.callbacks.divergence import Diverged
from lm_opt.callbacks.optimizer import OptimizerCallback
from lm_opt.optim.state import state_bytes
from lm_opt.provenance import provenance

log = logging.getLogger("lm_opt")


def data_epochs(trainer: L.Trainer) -> float | None:
    """Passes over the training data of the run's data module, where it tracks them (lm_opt.data),
    rounded to 4 decimals; None within the first pass."""
    loader = getattr(trainer.datamodule, "train_loader", None)
    epochs = loader.epochs() if hasattr(loader, "epochs") else None
    return None if epochs is None else round(epochs, 4)


def describe_error(exception: BaseException) -> str:
    """`Type: message` of the first error in the chain that ended the run, then of each later one: a
    wrapper raised from it (Lightning's TensorBoard logger reports any failed write, a full disk
    included, as "you tried to log X which is currently not supported") or a failure while handling it."""
    chain = [exception]
    while chain[-1].__context__ is not None and len(chain) < 5:
        chain.append(chain[-1].__context__)
    chain.reverse()

    def one_line(error: BaseException) -> str:
        return " ".join(f"{type(error).__name__}: {error}".split())

    text = one_line(chain[0])
    for earlier, later in zip(chain, chain[1:]):
        how = "reported as" if later.__cause__ is earlier else "then, while handling it,"
        text += f" ({how} {one_line(later)})"
    return text


class RunRecord(SaveConfigCallback):
    """Saves the resolved config (as Lightning's SaveConfigCallback) and, at the end of `fit`,
    the summary that sweeps and reports read (lm_opt.record.RunSummary): status, final and best
    validation loss, steps, tokens, wall time, the full config and its provenance (code commit,
    package versions, device, precision, data and tokenizer identity; lm_opt.provenance).

    The summary also holds the validation curve (`val_curve`: [step, loss] pairs, kept across a
    resume through the checkpoint, for steps-to-target in `report`) and the median wall time of
    this process's training steps (`step_time_s`, hooks to hooks, for per-step cost ratios), and
    the bytes of the optimizer state this process holds (`optimizer_state_bytes`; a DTensor counts
    whole, state kept by its owner rank alone does not).

    Status is `finished`, `diverged` (with what the divergence callback recorded),
    `interrupted` (Ctrl-C; SIGTERM or Slurm's SIGUSR1, after saving the step: lm_opt.callbacks.preemption)
    or `failed` (an exception, with its message).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.log_dir = trainer.log_dir  # a collective under DDP: read it here, on every rank
        self.start_time = time.time()
        self.ended = False
        self.best_val_loss = math.inf
        self.final_val_loss = math.nan
        self.final_val_step: int | None = None
        self.val_curve: list[list[float]] = []
        self.step_times: list[float] = []
        self.step_start: float | None = None
        # Read when the run starts: the checkout may change while it runs.
        classes = [c for cb in trainer.callbacks if isinstance(cb, OptimizerCallback) for c in cb.classes]
        self.provenance = provenance(trainer, trainer.datamodule, classes) if trainer.is_global_zero else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        self.final_val_loss = trainer.callback_metrics["val/loss"].item()
        self.final_val_step = trainer.global_step
        self.val_curve.append([trainer.global_step, self.final_val_loss])
        if self.final_val_loss < self.best_val_loss:
            self.best_val_loss = self.final_val_loss

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self.step_start is None:  # the first micro-batch of an optimizer step
            self.step_start, self.step_of = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if self.step_start is not None and trainer.global_step > self.step_of:
            self.step_times.append(time.perf_counter() - self.step_start)
            self.step_start = None

    def median_step_time(self) -> float | None:
        """The first steps warm up allocators and caches (5 of them, or 1 in a short run); a median
        ignores the stragglers."""
        times = self.step_times[5:] or self.step_times[1:]
        return statistics.median(times) if times else None

    def state_dict(self) -> dict[str, Any]:
        return {"val_curve": self.val_curve, "best_val_loss": self.best_val_loss,
                "final_val_loss": self.final_val_loss, "final_val_step": self.final_val_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_summary(trainer, pl_module, {"status": "finished"})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, Diverged):
            self.write_summary(trainer, pl_module, exception.status)
            return
        # Ctrl-C, or a scheduler's signal (lm_opt.callbacks.preemption): the run can resume from last.ckpt.
        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
        self.write_summary(trainer, pl_module, {"status": status, "error": describe_error(exception)})

    def record_failure(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Write a `failed` summary where the run ended without one (its `on_exception` never ran or
        failed itself); where the folder is gone too, say so and leave the exception to end the run."""
        if getattr(self, "ended", True):  # ended, or never set up (e.g. refused before fit)
            return
        try:
            self.on_exception(trainer, pl_module, exception)
        except Exception as err:
            log.error(f"could not write {record.summary_path(self.log_dir)}: {type(err).__name__}: {err}")

    def write_summary(self, trainer: L.Trainer, pl_module: L.LightningModule, status: dict[str, Any]) -> None:
        if not trainer.is_global_zero or getattr(self, "log_dir", None) is None:
            return
        steps = trainer.global_step
        summary = record.RunSummary.from_json({
            **status,
            "final_val_loss": None if math.isnan(self.final_val_loss) else self.final_val_loss,
            "final_val_step": self.final_val_step,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "steps": steps,
            "max_steps": trainer.max_steps,
            "tokens": steps * pl_module.tokens_per_step(),
            "epochs": data_epochs(trainer),
            "parameters": pl_module.model.num_params(),
            "wall_time_s": round(time.time() - self.start_time, 2),
            "step_time_s": self.median_step_time(),
            "val_curve": self.val_curve,
            "optimizer_state_bytes": sum(state_bytes(s) for opt in trainer.optimizers for s in opt.state.values()),
            "config": json.loads(self.parser.dump(self.config, format="json", skip_unset=False)),
            "provenance": self.provenance,
        })
        record.write_summary(Path(self.log_dir), summary)
        self.ended = True
