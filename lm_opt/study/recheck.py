"""`python -m lm_opt recheck SWEEP_DIR [--points 2] [--seed S] [--tolerance 0.02] [--threads N]`: do
finished points of a sweep rerun to their recorded results?

Draws `points` finished points at random (seeded, so a check can be repeated), reruns each with the
command its point record holds (the sweep's own command, under this interpreter, with the CPU
threads its summary records) into a temporary folder, and compares the final validation loss
with the recorded one. A CPU record older than the thread count in summaries needs `--threads`:
its sweep's header says how it ran, and another count takes another rounding path. Exit status 1
where one differs by more than `tolerance` nats, 2 where the folder has no finished point or a
drawn point's threads are unknown (before anything runs).

A rerun matches to the last digit on the machine and software that made the record; another CPU
or torch version takes another rounding path, and training amplifies it (docs/results/cpu_study.md).
A record made on another kind of CPU (lm_opt.precision.cpu_arithmetic) is rerun with a note that
says so; every rerun runs in the precision its record ran in.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from lm_opt.precision import cpu_arithmetic, describe, same_kind
from lm_opt.provenance import cpu_name
from lm_opt.record import POINT_FILE, RunSummary, read_point, read_summary, summary_path
from lm_opt.study.sweep_plan import SpecError


def finished_points(sweep_dir: Path) -> list[Path]:
    """Point folders whose run finished and whose point record holds its command."""
    return [d for d in sorted(sweep_dir.iterdir()) if d.is_dir() and read_point(d) is not None
            and read_summary(d).status == "finished"]


def recorded_threads(point_dir: Path, default: int | None) -> int | None:
    """The CPU threads the point's run recorded, else `default`; None for a run on another device."""
    device = read_summary(point_dir).device
    if device.get("type", "cpu") != "cpu":
        return None
    threads = device.get("threads") or default
    if threads is None:
        raise SpecError(f"{summary_path(point_dir)} does not record the CPU threads its run used (a record older "
                        "than lm_opt's thread count): pass --threads as its sweep ran, e.g. --threads 1 for "
                        "`--jobs 2` on 2 cores or OMP_NUM_THREADS=1")
    return threads


def kind_note(point_dir: Path) -> str | None:
    """What to say where a CPU record was made on another kind of CPU than this one: its rerun takes
    another rounding path (and bf16 may be emulated here)."""
    device = read_summary(point_dir).device
    here = cpu_arithmetic()
    if device.get("type", "cpu") != "cpu" or (same_kind(device.get("arithmetic"), here)
                                              and device.get("name") == cpu_name()):
        return None
    made_on = f"{device.get('name')}, {describe(device.get('arithmetic'))}"
    note = (f"{point_dir.name} was recorded on another CPU ({made_on}) than this one ({cpu_name()}, {describe(here)}): "
            "its rerun takes another rounding path and can match only within noise, not to the last digit")
    if "bf16" in str(device.get("precision")) and not here["bf16_native"]:
        note += f"; it ran in {device['precision']}, which this CPU emulates, many times slower"
    return note


def rerun(point_dir: Path, out_dir: Path, threads: int | None = None) -> RunSummary:
    """The point's recorded command, its logs redirected to `out_dir`, with `threads` CPU threads and
    the precision its record says it ran in (`trainer.precision: auto` may resolve otherwise here);
    returns the new summary."""
    command = read_point(point_dir).command
    precision = read_summary(point_dir).device.get("precision")
    if precision:
        command = [*command, "--trainer.precision", precision]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = out_dir / f"{point_dir.name}.log"
    with open(log, "w") as output:
        subprocess.run([sys.executable, *command[1:], "--trainer.logger.init_args.save_dir", str(out_dir),
                        "--trainer.logger.init_args.name", point_dir.name], stdout=output, stderr=subprocess.STDOUT,
                       env=env)
    summary = read_summary(out_dir / point_dir.name)
    return summary if summary.status else replace(summary, status=f"no summary (see {log})")


def recheck(sweep_dir: Path, points: int, seed: int, tolerance: float, threads: int | None = None) -> list[dict]:
    candidates = finished_points(sweep_dir)
    if not candidates:
        raise SpecError(f"{sweep_dir} holds no finished point with a {POINT_FILE}")
    chosen = random.Random(seed).sample(candidates, min(points, len(candidates)))
    chosen_threads = [recorded_threads(point_dir, threads) for point_dir in chosen]  # every error before any run
    rows = []
    with tempfile.TemporaryDirectory(prefix="recheck-") as tmp:
        for point_dir, point_threads in zip(chosen, chosen_threads):
            if note := kind_note(point_dir):
                print(f"note: {note}", flush=True)
            recorded = read_summary(point_dir).final_val_loss
            again = rerun(point_dir, Path(tmp), point_threads)
            loss = again.final_val_loss
            delta = None if loss is None else loss - recorded
            rows.append({"point": point_dir.name, "recorded": recorded, "rerun": loss, "delta": delta,
                         "status": again.status, "ok": delta is not None and abs(delta) <= tolerance})
            print(f"{point_dir.name}: recorded {recorded:.4f}, rerun " + (
                f"{loss:.4f} ({delta:+.4f})" if loss is not None else str(again.status))
                  + ("" if rows[-1]["ok"] else f"  BEYOND {tolerance}"), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_opt recheck", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's out_dir, e.g. logs/sweeps/cpu_lr")
    parser.add_argument("--points", type=int, default=2, help="finished points to rerun, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--tolerance", type=float, default=0.02, help="nats a rerun may differ by")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for points whose record does not say (records it does not override)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    try:
        rows = recheck(args.sweep_dir, args.points, args.seed, args.tolerance, args.threads)
    except SpecError as err:
        print(f"lm_opt recheck: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not all(r["ok"] for r in rows):
        raise SystemExit(1)
