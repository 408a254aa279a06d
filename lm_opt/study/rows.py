"""A sweep's runs as typed rows, and how the report groups them into lines.

A row is one point folder read through lm_opt.record: its point record (optimizer and swept
values, written by `sweep`) and its run's summary. A folder with a summary alone (a run made by
hand) counts as a point of its first optimizer's class at its lr. A row is plotted against its
optimizer's first own axis (`x_axis`); its optimizer and the values of its other axes make its
line (`series_key`): one line of a plot, one row of the stability table.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lm_opt.errors import UserError
from lm_opt.record import PointRecord, launched, read_point, read_summary
from lm_opt.study.sweep_plan import format_value, short_name

FIELDS = ("final_val_loss", "best_val_loss", "status", "steps", "max_steps", "tokens", "wall_time_s", "step_time_s",
          "error")
"""A row's columns in results.csv, after its point, optimizer, axes and seed."""
SUMMARY_FIELDS = ("final_val_loss", "best_val_loss", "steps", "max_steps", "tokens", "wall_time_s", "step_time_s",
                  "error", "val_curve", "optimizer_state_bytes", "parameters")
"""What a row takes from its run's summary (the validation curve and the state for steps to target)."""


@dataclass(frozen=True)
class Row:
    """One run of a sweep: its point and what its run's summary says."""

    point: str
    optimizer: str
    seed: int | None
    """The seed of a repeat (the spec's `seeds`, `grid_seeds`); None for the grid's own run."""
    values: dict[str, Any]
    """Axis name -> value, the seed left out."""
    shared: list[str]
    """The axes that come from the spec's shared grid."""
    sweep: str
    run_dir: Path
    copied: bool
    """Whether the record is a copy of another sweep's run (lm_opt.study.reuse) rather than run here."""
    status: str
    """The summary's status, else `incomplete` (the run started) or `not run`."""
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    steps: int | None = None
    max_steps: int | None = None
    tokens: int | None = None
    wall_time_s: float | None = None
    step_time_s: float | None = None
    error: str | None = None
    val_curve: list[list[float]] | None = None
    optimizer_state_bytes: int | None = None
    parameters: int | None = None


def show(value: Any) -> str:
    """A swept value for tables and legends; a paired axis' mapping as `qk_norm=false, z_loss=0`."""
    if isinstance(value, dict):
        return ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in value.items())
    return format_value(value)


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_row(run_dir: Path) -> Row | None:
    """The folder's run (status `incomplete` or `not run` where it has no summary); None where the
    folder holds neither a point record nor a summary."""
    summary, point = read_summary(run_dir), read_point(run_dir)
    if point is None and summary.status is None:
        return None
    if point is None:
        point = infer_point(run_dir.name, summary.config or {})
    values = dict(point.values)
    seed = values.pop("seed", None)
    status = summary.status or ("incomplete" if launched(run_dir) else "not run")
    return Row(point.name, point.optimizer, seed, values, point.shared, point.sweep or run_dir.parent.name, run_dir,
               point.copied_from is not None, status, **{k: getattr(summary, k) for k in SUMMARY_FIELDS})


def infer_point(name: str, config: dict) -> PointRecord:
    """Optimizer class and lr of a run's first route, from the config in its summary."""
    from lm_opt.callbacks.optimizer import optimizer_args

    try:
        args = optimizer_args(config, name)
    except UserError:
        args = {}
    optimizer = args.get("optimizer") or ((args.get("routes") or [{}])[0]).get("optimizer") or {}
    label = str(optimizer.get("class_path", "unknown")).rpartition(".")[2]
    lr = (optimizer.get("init_args") or {}).get("lr")
    return PointRecord(name=name, optimizer=label, values={} if lr is None else {"lr": lr})


def load_rows(sweep_dir: Path) -> list[Row]:
    """The points, ordered by optimizer, line and swept value."""
    rows = [read_row(d) for d in sorted(Path(sweep_dir).iterdir()) if d.is_dir()]
    rows = [r for r in rows if r is not None]

    def order(row: Row) -> tuple:
        x = row.values.get(x_axis(row))
        return (*series_key(row), (0, x, "") if numeric(x) else (1, 0, str(x)), row.seed or 0)

    return sorted(rows, key=order)


def swept_axes(rows: list[Row]) -> list[str]:
    """Every axis the rows were swept along, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r.values))


def x_axis(row: Row) -> str | None:
    """The axis a row is plotted against: its optimizer's first own axis, else the first shared."""
    own = [k for k in row.values if k not in row.shared]
    return (own or list(row.values) or [None])[0]


def series_key(row: Row) -> tuple[str, str]:
    """(optimizer, the other axes' values): one line of a plot, one row of the stability table."""
    x = x_axis(row)
    rest = "; ".join(show(v) if isinstance(v, dict) else f"{k}={show(v)}" for k, v in row.values.items() if k != x)
    return row.optimizer, rest


def labelled(rows: list[Row]) -> list[Row]:
    """Rows with their sweep as one more shared axis: each sweep's own line per optimizer in a plot."""
    return [replace(r, values={**r.values, "sweep": r.sweep}, shared=[*r.shared, "sweep"]) for r in rows]


def ran_here(rows: list[Row]) -> tuple[list[Row], int]:
    """The rows of the runs a sweep ran itself (with a wall time), and how many records it copied
    from another sweep instead: what rerunning it costs."""
    return [r for r in rows if not r.copied and r.wall_time_s is not None], sum(r.copied for r in rows)
