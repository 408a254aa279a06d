"""Running `python -m lm_opt` in-process on the tiny preset and the embedded data, and reading
what a run leaves behind."""

import json
from pathlib import Path

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_opt.cli import main

QUICKSTART = "configs/quickstart.yaml"


def tiny_args(log_dir: Path, name: str = "run", steps: int = 4, *extra: str, config: str = QUICKSTART) -> list[str]:
    """`fit` arguments for a run of a few steps that takes seconds on a CPU."""
    return [
        "fit", "--config", config, "--model.preset", "tiny",
        "--data.seq_len", "32", "--data.batch_size", "4", "--data.val_sequences", "8", "--data.num_workers", "0",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(log_dir), "--trainer.logger.init_args.name", name,
        *extra,
    ]


def fit(*args: str) -> None:
    main(list(args))


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar, the last write winning (a resumed run rewrites)."""
    out = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


class StopAtStep(L.Callback):
    """Ends a run gracefully after `step` optimizer steps, as an interruption would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def stop_at(step: int) -> tuple[str, str]:
    return ("--trainer.callbacks+=cli_helpers.StopAtStep", f"--trainer.callbacks.step={step}")
