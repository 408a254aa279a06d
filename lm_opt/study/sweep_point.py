"""A sweep point's folder: what `sweep` writes into it (the point's optimizer YAML, `command.sh` and
point record) and the state that its run's record shows.

`command.sh` runs, reruns or resumes the point alone, and is what local runs and Slurm tasks both
run. It holds the folder's lock (lm_opt.run_lock) before it reads or changes the folder: the lock
that `sweep` hands it, or, run alone or by Slurm, one that it takes with flock(1), the same flock(2)
lock as the Python side's; a point that another process holds is refused.
"""

import os
import shlex
from pathlib import Path

import yaml

from lm_opt.record import COMMAND_FILE, OPTIMIZER_YAML, SUMMARY_FILE, PointRecord, read_point, read_summary
from lm_opt.record import write_point as write_point_record
from lm_opt.run_lock import FD_ENV, HOLDER_FILE, LOCK_FILE
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
# A finished or diverged point is left alone; an interrupted one resumes from last.ckpt; one
# that another process runs is refused (exit status 2).
# Runs from any clone: it starts where the sweep ran, relative to this file, with $PYTHON or `python`.
set -e
cd "$(dirname "${{BASH_SOURCE[0]}}")"/{cwd}
RUN={run_dir}
# One process at a time in the run folder (lm_opt/run_lock.py): `sweep` hands this script its lock
# in ${fd_env}; run alone or by Slurm, the script takes it before it reads or changes the folder.
if [ -z "${{{fd_env}:-}}" ] && [ "${{SLURM_PROCID:-0}}" = 0 ] && command -v flock >/dev/null; then
  exec 9>>"$RUN/{lock}"
  flock -n 9 || HELD=$?  # 1: another process holds it; another status: no locks here, the run goes on
  if [ "${{HELD:-0}}" = 1 ]; then
    echo "error: $RUN is in use by another process: $(cat "$RUN/{holder}" 2>/dev/null | tr -s '\\n ' ' ')" >&2
    exit 2
  fi
  if [ -s "$RUN/{holder}" ]; then  # left by a holder that was killed: it blocks nobody
    echo "$RUN: taking it over from $(tr -s '\\n ' ' ' <"$RUN/{holder}"), which ended without releasing it"
    rm -f "$RUN/{holder}"
  fi
  export {fd_env}=9
fi
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


def replace_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write through a temporary file and rename: another sweep may be running the point from these
    files (bash reads a script as it goes, `fit` its optimizer YAML as it starts)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_point(point: Point, sweep: str, copied_from: Path | None = None) -> Path:
    """The point's folder: its optimizer YAML, `command.sh` and point record (with the run folder
    its record was copied from, if it was)."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Optimizer of point {point.name} of sweep {sweep}, written by `python -m lm_opt sweep`.\n"
    replace_text(point.run_dir / OPTIMIZER_YAML, header + yaml.safe_dump(point.optimizer_yaml, sort_keys=False))
    command = command_of(point)
    script = point.run_dir / COMMAND_FILE
    replace_text(script, COMMAND_TEMPLATE.format(
        name=point.name, sweep=sweep, script=shlex.quote(str(script)),
        cwd=shlex.quote(os.path.relpath(os.getcwd(), point.run_dir.resolve())),
        run_dir=shlex.quote(str(point.run_dir)), summary=SUMMARY_FILE, done="|".join(DONE), fd_env=FD_ENV,
        lock=LOCK_FILE, holder=HOLDER_FILE, command=shell_lines(command[1:])), mode=0o755)
    write_point_record(point.run_dir, PointRecord(sweep, point.name, point.optimizer, point.values, point.shared, command,
                                                  None if copied_from is None else str(copied_from)))
    return script
