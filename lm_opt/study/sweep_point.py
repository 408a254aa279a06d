"""A sweep point's folder: what `sweep` writes into it (the point's optimizer YAML, `command.sh` and
point record) and the state that its run's record shows."""

import os
import shlex
from pathlib import Path

import yaml

from lm_opt.record import COMMAND_FILE, OPTIMIZER_YAML, SUMMARY_FILE, PointRecord, read_point, read_summary
from lm_opt.record import write_point as write_point_record
from lm_opt.study.sweep_plan import DONE, Point

STARTING = {"resume": " (resuming from last.ckpt)", "retry": " (again: its last attempt did not finish)"}
"""How a point's start is announced, by its `point_state`."""


def point_state(run_dir: Path) -> str:
    """`done` (finished or diverged), `resume` (from last.ckpt), `retry` (ended unfinished without a
    checkpoint) or `start`."""
    status = read_status(run_dir)
    if status in DONE:
        return "done"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "retry" if status else "start"


def read_status(run_dir: Path) -> str | None:
    """The run's status (`finished`, `diverged`, `failed`, ...); None before it has ended."""
    return read_summary(run_dir).status


COMMAND_TEMPLATE = """#!/usr/bin/env bash
# Point {name} of sweep {sweep} (`python -m lm_opt sweep`). Run, rerun or resume it alone:
#   bash {script}
# A finished or diverged point is left alone; an interrupted one resumes from last.ckpt.
# Runs from any clone: it starts where the sweep ran, relative to this file, with $PYTHON or `python`.
set -e
cd "$(dirname "${{BASH_SOURCE[0]}}")"/{cwd}
RUN={run_dir}
if [ -f "$RUN/{summary}" ] && grep -Eq '"status": "({done})"' "$RUN/{summary}"; then
  echo "$RUN is done: $(grep -Eo '"status": "[a-z]+"' "$RUN/{summary}")"
  exit 0
fi
RESUME=()
if [ -f "$RUN/checkpoints/last.ckpt" ]; then RESUME=(--ckpt_path last)
elif [ "${{SLURM_PROCID:-0}}" = 0 ]; then  # an attempt without a checkpoint starts over (once, under srun)
  rm -f "$RUN"/events.out.tfevents.* "$RUN/{summary}"
fi
exec "${{PYTHON:-python}}" {command} "${{RESUME[@]}}"
"""


def shell_lines(command: list[str]) -> str:
    """The command quoted for bash, one `--key value` per line."""
    lines: list[list[str]] = [[]]
    for arg in command:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n  ".join(" ".join(line) for line in lines)


def command_of(point: Point) -> list[str]:
    """The point's full command, as written to its command.sh and its point record: `python` is
    whichever interpreter runs it (`$PYTHON` in command.sh, which `sweep` sets to its own)."""
    return ["python", "-m", "lm_opt", *point.fit_args()]


def recorded_command(run_dir: Path) -> list[str] | None:
    """The command a point's folder was last written with; None where it has no point record."""
    record = read_point(run_dir)
    return None if record is None else record.command


def write_point(point: Point, sweep: str, copied_from: Path | None = None) -> Path:
    """The point's folder: its optimizer YAML, `command.sh` and point record (with the run folder
    its record was copied from, if it was)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Optimizer of point {point.name} of sweep {sweep}, written by `python -m lm_opt sweep`.\n"
    (point.run_dir / OPTIMIZER_YAML).write_text(header + yaml.safe_dump(point.optimizer_yaml, sort_keys=False))
    command = command_of(point)
    script = point.run_dir / COMMAND_FILE
    script.write_text(COMMAND_TEMPLATE.format(
        name=point.name, sweep=sweep, script=shlex.quote(str(script)),
        cwd=shlex.quote(os.path.relpath(os.getcwd(), point.run_dir.resolve())),
        run_dir=shlex.quote(str(point.run_dir)), summary=SUMMARY_FILE, done="|".join(DONE),
        command=shell_lines(command[1:])))
    script.chmod(0o755)
    write_point_record(point.run_dir, PointRecord(sweep, point.name, point.optimizer, point.values, point.shared, command,
                                                  None if copied_from is None else str(copied_from)))
    return script
