"""A run's record and a sweep's records on disk: the one reader and writer of their files.

A run's log folder holds `config.yaml` (its resolved config, written when it starts) and
`summary.json` (`RunSummary`, written by lm_opt.callbacks.run_record when it ends: how it ended,
its losses and validation curve, its config again and its provenance). A sweep's folder
(lm_opt.study.sweep) holds a folder per point, with the point's `optimizer.yaml`, `command.sh`
and `point.json` (`PointRecord`: its swept values and command), its `fit.log` and its run's
record; and the sweep's own files: `sweep.yaml` (the spec it ran), `baseline.json` (the data's
unigram baseline) and the report (`results.csv`, `results.md`, `plot_*.png`).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
POINT_FILE = "point.json"
OPTIMIZER_YAML = "optimizer.yaml"
"""A point's copy of its optimizer YAML, with the point's values set in it."""
COMMAND_FILE = "command.sh"
LOG_FILE = "fit.log"
POINT_FILES = (POINT_FILE, COMMAND_FILE, OPTIMIZER_YAML)
"""What `sweep` writes into a point's folder; the rest is its run's record."""
SPEC_FILE = "sweep.yaml"
BASELINE_FILE = "baseline.json"
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file (the temporary
    file is this process's own: two sweeps sharing a folder write its point records at once)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's mapping; None where it is missing or not (yet) readable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunSummary:
    """A run's `summary.json`. A field is None where the record does not say: a run that has not
    ended yet has no summary at all, an older record lacks the fields added since."""

    status: str | None = None
    """`finished`, `diverged`, `interrupted` (a signal or Ctrl-C; it can resume) or `failed`."""
    error: str | None = None
    """What ended an interrupted or failed run (lm_opt.callbacks.run_record.describe_error)."""
    final_val_loss: float | None = None
    final_val_step: int | None = None
    best_val_loss: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    tokens: int | None = None
    epochs: float | None = None
    """Passes over the training data (2.25: two whole passes and a quarter of the third); None for a
    run that ended within its first pass, or a record older than the field."""
    parameters: int | None = None
    wall_time_s: float | None = None
    step_time_s: float | None = None
    """Median wall time of this process's training steps."""
    val_curve: list[list[float]] | None = None
    """[step, validation loss] at each validation."""
    optimizer_state_bytes: int | None = None
    config: dict[str, Any] | None = None
    """The resolved config, as `config.yaml` holds it."""
    provenance: dict[str, Any] | None = None
    """What produced the run: code, packages, device, data (lm_opt.provenance)."""
    ending: dict[str, Any] = field(default_factory=dict)
    """What else the run's end recorded: where a diverged run diverged (lm_opt.callbacks.divergence)."""

    @property
    def device(self) -> dict[str, Any]:
        """The device the run ran on, as its provenance records it (type, name, threads, precision, ...)."""
        return (self.provenance or {}).get("device") or {}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSummary":
        known = {f.name for f in fields(cls)} - {"ending"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   ending={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict[str, Any]:
        """The mapping as written: how the run ended first, then its numbers, config and provenance."""
        data = asdict(self)
        head = {"status": data.pop("status")}
        error = data.pop("error")
        if error is not None:
            head["error"] = error
        return {**head, **data.pop("ending"), **data}


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def read_summary(run_dir: Path) -> RunSummary:
    """The run's summary; an empty one (status None) where the run has not written one."""
    data = read_json(summary_path(run_dir))
    return RunSummary() if data is None else RunSummary.from_json(data)


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    write_json_atomic(summary_path(run_dir), summary.to_json())


def sweep_runs(sweeps_root: Path) -> Iterator[tuple[Path, RunSummary]]:
    """Each run folder `sweeps_root/<sweep>/<point>` that holds a readable summary, with it."""
    for path in sorted(Path(sweeps_root).glob(f"*/*/{SUMMARY_FILE}")):
        data = read_json(path)
        if data is not None:
            yield path.parent, RunSummary.from_json(data)


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config from its `config.yaml`; None where it has none."""
    path = Path(run_dir) / CONFIG_FILE
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def launched(run_dir: Path) -> bool:
    """Whether a run started in the folder: its config or its log is there."""
    return (Path(run_dir) / CONFIG_FILE).is_file() or (Path(run_dir) / LOG_FILE).is_file()


@dataclass(frozen=True)
class PointRecord:
    """A sweep point's `point.json`, written with its folder by `sweep`: what `report` groups runs
    by and `recheck` reruns. A field is None (or empty) where the file does not say."""

    sweep: str | None = None
    name: str | None = None
    optimizer: str | None = None
    """The optimizer's label in the spec."""
    values: dict[str, Any] = field(default_factory=dict)
    """Axis name -> value, the optimizer's axes first; a seed repeat's `seed` too."""
    shared: list[str] = field(default_factory=list)
    """The axes that come from the spec's shared grid."""
    command: list[str] | None = None
    """The run's command, `python` first: whichever interpreter runs it."""
    copied_from: str | None = None
    """The run folder whose record the point took instead of running (lm_opt.study.reuse)."""


def read_point(run_dir: Path) -> PointRecord | None:
    """The point's record; None where the folder has none."""
    data = read_json(Path(run_dir) / POINT_FILE)
    if data is None:
        return None
    known = {f.name for f in fields(PointRecord)}
    return PointRecord(**{k: v for k, v in data.items() if k in known})


def write_point(run_dir: Path, record: PointRecord) -> None:
    data = asdict(record)
    if record.copied_from is None:
        del data["copied_from"]
    write_json_atomic(Path(run_dir) / POINT_FILE, data)  # another sweep may be reading it


def read_baseline(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's cached unigram baseline (lm_opt.study.baseline); None before it is computed."""
    path = Path(sweep_dir) / BASELINE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_baseline(sweep_dir: Path, baseline: dict[str, Any]) -> None:
    (Path(sweep_dir) / BASELINE_FILE).write_text(json.dumps(baseline, indent=1))
