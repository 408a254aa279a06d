"""Running `python -m lm_opt` in-process on the tiny preset and the embedded data, and reading
what a run leaves behind."""

import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_opt.cli import main

QUICKSTART = "configs/quickstart.yaml"
# SOAP's and Shampoo's factors of the tiny preset's 8192-token embedding and output layer take
# minutes to decompose. 1024 leaves that axis unpreconditioned, as the study's 32100-token axis is
# at max_precond_dim 10000, and keeps every other factor (at most 512 wide).
SMALL_FACTORS = 1024


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


def optim_config(config: Path, tmp_path: Path) -> Path:
    """An optimizer config as shipped, or, for SOAP and Shampoo, a copy with SMALL_FACTORS."""
    settings = yaml.safe_load(config.read_text())
    optimizer = settings["trainer"]["callbacks"][0]["init_args"]["optimizer"]
    if not optimizer or optimizer["class_path"] not in ("lm_opt.optim.SOAP", "lm_opt.optim.Shampoo"):
        return config
    optimizer["init_args"]["max_precond_dim"] = SMALL_FACTORS
    copy = tmp_path / f"{config.stem}_small_factors.yaml"
    copy.write_text(yaml.safe_dump(settings))
    return copy


def fit(*args: str) -> None:
    main(list(args))


def fit_fails(capsys, *args: str) -> str:
    """The `error:` line of a `fit` that must end as a user error: exit status 2, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        fit(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def events(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) written for a TensorBoard scalar, in the order of the event files."""
    out = []
    for path in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar, the last write winning (a resumed run rewrites)."""
    return dict(events(run_dir, tag))


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
