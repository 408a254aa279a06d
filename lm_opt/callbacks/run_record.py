"""The run's record in its log folder: `config.yaml` when it starts, `summary.json` when it ends."""

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm_opt.callbacks.divergence import Diverged
from lm_opt.provenance import provenance

SUMMARY_FILE = "summary.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class RunRecord(SaveConfigCallback):
    """Saves the resolved config (as Lightning's SaveConfigCallback) and, at the end of `fit`,
    a `summary.json` that sweeps and reports read: status, final and best validation loss,
    steps, tokens, wall time, the full config and its provenance (code commit, package
    versions, device, precision, data and tokenizer identity; lm_opt.provenance).

    Status is `finished`, `diverged` (with what the divergence callback recorded),
    `interrupted` (Ctrl-C; SIGTERM or Slurm's SIGUSR1, after saving the step: lm_opt.callbacks.preemption)
    or `failed` (an exception, with its message).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.log_dir = trainer.log_dir  # a collective under DDP: read it here, on every rank
        self.start_time = time.time()
        self.best_val_loss = math.inf
        self.final_val_loss = math.nan
        self.final_val_step: int | None = None
        # Read when the run starts: the checkout may change while it runs.
        self.provenance = provenance(trainer, trainer.datamodule) if trainer.is_global_zero else None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        self.final_val_loss = trainer.callback_metrics["val/loss"].item()
        self.final_val_step = trainer.global_step
        if self.final_val_loss < self.best_val_loss:
            self.best_val_loss = self.final_val_loss

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write_summary(trainer, pl_module, {"status": "finished"})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, Diverged):
            self.write_summary(trainer, pl_module, exception.status)
            return
        # Ctrl-C, or a scheduler's signal (lm_opt.callbacks.preemption): the run can resume from last.ckpt.
        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) else "failed"
        self.write_summary(trainer, pl_module, {"status": status, "error": f"{type(exception).__name__}: {exception}"})

    def write_summary(self, trainer: L.Trainer, pl_module: L.LightningModule, status: dict[str, Any]) -> None:
        if not trainer.is_global_zero or getattr(self, "log_dir", None) is None:
            return
        steps = trainer.global_step
        summary = {
            **status,
            "final_val_loss": None if math.isnan(self.final_val_loss) else self.final_val_loss,
            "final_val_step": self.final_val_step,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "steps": steps,
            "max_steps": trainer.max_steps,
            "tokens": steps * pl_module.tokens_per_step(),
            "parameters": pl_module.model.num_params(),
            "wall_time_s": round(time.time() - self.start_time, 2),
            "config": self.parser.dump(self.config, format="json", skip_unset=False),
            "provenance": self.provenance,
        }
        summary["config"] = json.loads(summary["config"])
        write_json_atomic(Path(self.log_dir) / SUMMARY_FILE, summary)
