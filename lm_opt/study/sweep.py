"""`python -m lm_opt sweep SPEC [--jobs N] [--commit] [--slurm] [--dry-run]`: a grid of ordinary `fit` runs.

Each point of the spec (planned and checked by `lm_opt.study.sweep_plan`) is one `python -m lm_opt
fit` run in its own folder `out_dir/<point name>`, which holds the point's optimizer YAML (a
copy of the optimizer's with the swept values), `command.sh` (run it to run, rerun or resume
the point alone; local runs and Slurm tasks both run exactly it) and its point record (the swept
values and the command, for `report` and `recheck`: lm_opt.record.PointRecord). Every point's config is parsed before anything launches. A rerun skips
finished and diverged points and resumes the others. Once a line's grid is done (an optimizer,
at one value of the shared grid), its best point runs again with each of the spec's `seeds`,
so that every comparison can be read against seed noise; `grid_seeds` run every point again.
A CPU point that a sibling sweep already ran with the same config on this CPU, threads and
packages takes a copy of that record instead (`lm_opt.study.reuse`; `--no-reuse` runs it).

With `--commit`, each point's record (its folder but checkpoints and event files) is committed to
the checkout's git as soon as the point is done, so that a study longer than one sitting can be
pushed as it goes and resumed from a fresh clone, which skips the committed points. With
`--drop-checkpoints`, a done point's checkpoints are deleted once its record is written (and committed).

Several sweeps may share one folder (two terminals, a Slurm array beside a local sweep): each point
runs once, under its run folder's lock, in whichever process claims it first, and the others wait
for its result (lm_opt.study.claims).
"""

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lm_opt.precision import cpu_arithmetic, describe, same_kind
from lm_opt.record import COMMAND_FILE, LOG_FILE, SPEC_FILE, SUMMARY_FILE, read_summary
from lm_opt.run_lock import FD_ENV, LOCK_FILES
from lm_opt.study.claims import Claims, copy_if_free
from lm_opt.study.report import write_report
from lm_opt.study.reuse import known_runs, run_key
from lm_opt.study.sweep_plan import (DONE, Point, SpecError, command_endings, line_of, load_spec, plan, validate,
                                     with_seed)
from lm_opt.study.sweep_point import STARTING, command_of, point_state, read_status, recorded_command, write_point
from lm_opt.study.sweep_repeats import stable_repeats

FLOAT32 = "32-true"


@dataclass(frozen=True)
class WhenDone:
    """What becomes of a point's folder once its run is done (finished or diverged): with `commit` its
    record is committed; with `drop_checkpoints` its checkpoints are then deleted. Only an unfinished
    run needs them, to resume, and a long sweep's add up (best.ckpt and last.ckpt of every point of
    cpu_scale: about 50 GB); they stay unless asked, so that no finished checkpoint is lost by default."""

    commit: bool = False
    drop_checkpoints: bool = False

    def settle(self, point: Point) -> None:
        if self.commit:
            commit_record(point)
        if self.drop_checkpoints:
            shutil.rmtree(point.run_dir / "checkpoints", ignore_errors=True)

    def catch_up(self, done: list[Point]) -> None:
        """At a sweep's start: commit the done records a failed commit left out, and drop the
        checkpoints that done points still hold (kept by an earlier run without the flag)."""
        if self.commit:
            commit_uncommitted(done)
        if self.drop_checkpoints:
            held = [p for p in done if (p.run_dir / "checkpoints").exists()]
            for point in held:
                shutil.rmtree(point.run_dir / "checkpoints", ignore_errors=True)
            if held:
                print(f"deleted the checkpoints of {len(held)} done points (--drop-checkpoints)", flush=True)


def commit_record(point: Point) -> None:
    """Commit a done point's folder, less checkpoints and event files, and nothing else that is staged."""
    summary = read_summary(point.run_dir)
    loss = summary.final_val_loss
    commit_files(point.run_dir, f"{point.run_dir.parent.name}: {point.name} {summary.status}" + (
        "" if loss is None else f" (final val loss {loss:.4f})"))


def commit_uncommitted(done: list[Point]) -> None:
    """Commit each of the done points whose summary git does not track yet: a record whose commit
    failed (another git command held the index) is committed when the sweep next starts."""
    for point in done:
        if (point.run_dir / SUMMARY_FILE).is_file() and subprocess.run(
                ["git", "-C", str(point.run_dir), "ls-files", "--error-unmatch", SUMMARY_FILE],
                capture_output=True).returncode != 0:
            commit_record(point)


def commit_files(folder: Path, message: str) -> None:
    """Commit the files directly in `folder` (not its subfolders or event files), ignored or not, and
    nothing else that is staged, to the repository that holds `folder`; a failure is a warning (the
    files stay on disk)."""
    files = [f.name for f in sorted(folder.iterdir())
             if f.is_file() and not f.name.startswith("events.out") and f.name not in LOCK_FILES]
    git = ["git", "-C", str(folder)]
    try:
        subprocess.run([*git, "add", "--force", "--", *files], check=True, capture_output=True, text=True)
        subprocess.run([*git, "commit", "--quiet", "-m", message, "--", *files], check=True, capture_output=True,
                       text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        print(f"warning: could not commit {folder}: {str(detail).strip()}", flush=True)


SIGNAL_AHEAD_S = 300
"""How long before its time limit Slurm warns a task (SIGUSR1): time to finish the step in progress
and write its last.ckpt (a 1.2b run's checkpoint with AdamW is about 16 GB); Slurm may send it up
to a minute earlier."""


def tasks_per_node(devices) -> int:
    """Lightning's `trainer.devices` as Slurm tasks: one per device (1 where it is `auto`)."""
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    return len(devices) if isinstance(devices, list) else 1


def write_slurm(points: list[Point], spec: dict) -> Path:
    """An sbatch array script, one task per point, each running the point's command.sh once per
    device with srun, as Lightning's SLURMEnvironment expects; warned ahead of its time limit, a
    task saves its step and requeues itself (lm_opt.callbacks.preemption)."""
    out_dir = spec["out_dir"].resolve()
    trainer = points[0].resolved.get("trainer", {})
    devices = tasks_per_node(trainer.get("devices"))
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={spec['name']}", f"#SBATCH --array=0-{len(points) - 1}",
             f"#SBATCH --output={out_dir}/slurm/%A_%a.out", "#SBATCH --open-mode=append",
             f"#SBATCH --nodes={trainer.get('num_nodes') or 1}", f"#SBATCH --ntasks-per-node={devices}"]
    if trainer.get("accelerator") in ("gpu", "cuda"):
        lines.append(f"#SBATCH --gres=gpu:{devices}")
    lines += [f"#SBATCH --signal=USR1@{SIGNAL_AHEAD_S}", "#SBATCH --requeue",
              "# Add your cluster's --partition, --time, --cpus-per-task above. Submit with:",
              f"#   sbatch {out_dir}/sweep.sbatch",
              "# Each task runs one point's command.sh, as `python -m lm_opt sweep` does locally: finished",
              "# and diverged points are skipped, interrupted ones resume from last.ckpt. SIGUSR1, sent",
              f"# {SIGNAL_AHEAD_S} s before the time limit, makes the run save its current step and requeue",
              "# the task (scontrol requeue), which then resumes; a pre-emption or scancel (SIGTERM) saves",
              "# the step too. srun starts one process per device (outside Slurm, the script runs one). Then:",
              f"#   python -m lm_opt report {out_dir}",
              "POINTS=("] + [f"  {shlex.quote(str(p.run_dir.resolve()))}" for p in points] + [
              ")", 'RUN=${POINTS[$SLURM_ARRAY_TASK_ID]}',
              f'export PYTHON="${{PYTHON:-{sys.executable}}}"  # the interpreter each command.sh runs',
              "LAUNCH=(); if command -v srun >/dev/null; then LAUNCH=(srun --kill-on-bad-exit=1); fi",
              f'"${{LAUNCH[@]}}" bash "$RUN/{COMMAND_FILE}" >>"$RUN/{LOG_FILE}" 2>&1', ""]
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script = out_dir / "sweep.sbatch"
    script.write_text("\n".join(lines))
    return script


def gpu_slots() -> list[str]:
    """The CUDA devices to give one each to concurrent points; none on a CPU machine."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def outcome(point: Point, returncode: int) -> str | None:
    """None when the point ended as a result (finished or diverged), else what went wrong."""
    summary = read_summary(point.run_dir)
    status = summary.status
    if returncode == 0 and status in DONE:
        return None
    reason = summary.error or (f"status {status}" if status else f"no {SUMMARY_FILE}")
    return f"exit code {returncode}: {reason}"


def launch(point: Point, slot: str | None, env: dict) -> subprocess.Popen:
    """Start the point's command.sh, its output appended to fit.log, on GPU `slot` if any, with the
    descriptor of the point's lock that `env` names (FD_ENV) open in it."""
    env = dict(env, PYTHON=sys.executable, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
    with open(point.run_dir / LOG_FILE, "ab") as log:
        return subprocess.Popen(["bash", str(point.run_dir / COMMAND_FILE)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, pass_fds=[int(env[FD_ENV])] if FD_ENV in env else [])


def execute(points: list[Point], jobs: int, when_done: WhenDone = WhenDone()) -> dict[str, str | None]:
    """Run the points' command.sh, `jobs` at a time (one GPU each where there are GPUs), each under its
    lock (Claims), settling each point that ends done as `when_done` says. Returns once every point
    has ended, here or in the process that held it."""
    gpus = gpu_slots()
    slots: list[str | None] = gpus[:jobs] if gpus else [None] * jobs
    if gpus and jobs > len(gpus):
        print(f"--jobs {jobs} > {len(gpus)} GPUs: running {len(gpus)} at a time, one per GPU")
    env = dict(os.environ)
    if not gpus and jobs > 1:  # share the CPU cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(threads_per_job(jobs))
    claims, running, results = Claims(points), {}, {}
    try:
        while claims or running:
            while slots and (claimed := claims.next(results)):
                (i, point, lock), slot = claimed, slots.pop(0)
                print(f"[{i}/{len(points)}] start {point.name}{STARTING.get(point_state(point.run_dir), '')}"
                      + (f" on GPU {slot}" if slot is not None else ""), flush=True)
                handed = {FD_ENV: str(lock.fd)} if lock.fd is not None else {}
                running[launch(point, slot, dict(env, **handed))] = (i, point, slot, lock, time.time())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                i, point, slot, lock, start = running.pop(proc)
                slots.append(slot)
                results[point.name] = problem = outcome(point, proc.returncode)
                status = read_status(point.run_dir) if problem is None else f"CRASHED ({problem})"
                print(f"[{i}/{len(points)}] {point.name}: {status} after {time.time() - start:.0f} s", flush=True)
                if point_state(point.run_dir) == "done":
                    when_done.settle(point)
                lock.release()
    except KeyboardInterrupt:
        # Ctrl-C reached the points too (one process group): let them write `interrupted` summaries.
        for proc in running:
            proc.wait()
        raise
    return results


def best_of(points: list[Point]) -> Point | None:
    """The finished point with the lowest final val loss; None until every point is done."""
    summaries = [read_summary(p.run_dir) for p in points]
    if any(s.status not in DONE for s in summaries):
        return None
    finished = [(s.final_val_loss, p) for s, p in zip(summaries, points)
                if s.status == "finished" and s.final_val_loss is not None]
    return min(finished, key=lambda pair: pair[0])[1] if finished else None


def seed_points(points: list[Point], seeds: list[int]) -> list[Point]:
    """Each line's best point with every extra seed, for the lines whose grid is done."""
    lines: dict[tuple, list[Point]] = {}
    for p in points:
        lines.setdefault(line_of(p), []).append(p)
    best = [b for b in map(best_of, lines.values()) if b is not None]
    repeats = [with_seed(b, seed) for b in best for seed in seeds]
    for point in repeats:
        validate(point)
    return repeats


def threads_per_job(jobs: int) -> int:
    """The CPU threads each of `jobs` points run at once gets: OMP_NUM_THREADS where it is set, else
    the cores shared out (torch's default for a single job)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    if jobs > 1:
        return max(1, (os.cpu_count() or 1) // jobs)
    import torch

    return torch.get_num_threads()


def prepare(points: list[Point], spec: dict, runs: dict[str, Path] | None = None,
            when_done: WhenDone = WhenDone()) -> list[Point]:
    """Write the (validated) points' folders; returns those still to run. A point not done whose
    config matches one of `runs` (`lm_opt.study.reuse.known_runs`) gets that run's record instead."""
    states = {p.name: point_state(p.run_dir) for p in points}
    for point in points:  # a done point keeps the record of what it ran
        fresh = states[point.name] == "start" and runs and point.resolved
        source = runs.get(run_key(point.resolved)) if fresh else None  # a done run is never "start"
        if source is not None and copy_if_free(point, source, spec["name"]):
            states[point.name] = "done"
            print(f"{point.name}: done already as {source} (same config, precision, CPU and its kind, threads and packages); "
                  f"its record copied", flush=True)
            when_done.settle(point)
        elif states[point.name] != "done" or not (point.run_dir / COMMAND_FILE).is_file():
            write_point(point, spec["name"])
        elif (recorded_command(point.run_dir) or [None])[1:] != command_of(point)[1:]:  # any interpreter
            print(f"warning: {point.name} is done but ran another command (see its command.sh); "
                  f"delete {point.run_dir} to rerun it with this spec")
    when_done.catch_up([p for p in points if states[p.name] == "done"])
    return [p for p in points if states[p.name] != "done"]


def check_one_cpu_kind(points: list[Point]) -> None:
    """Refuse to add CPU runs to a sweep whose done runs were made on another kind of CPU
    (lm_opt.precision.same_kind): its points are compared with one another on one arithmetic. A
    float32 sweep's points may come from any kind: float32 losses agree across kinds to a few
    millionths of a nat (docs/results/cpu_study.md, "Which CPU made these records"), bf16's do not."""
    if all(point_state(p.run_dir) == "done" for p in points) or all(
            p.resolved.get("trainer", {}).get("precision") == FLOAT32 for p in points):
        return
    here = cpu_arithmetic()
    for point in points:
        device = read_summary(point.run_dir).device
        if device.get("type") == "cpu" and point_state(point.run_dir) == "done" and device.get(
                "precision") != FLOAT32 and not same_kind(device.get("arithmetic"), here):
            raise SpecError(f"{point.run_dir.parent} holds runs made on {describe(device.get('arithmetic'))} "
                            f"({point.name}); this CPU is {describe(here)}. A sweep compares its points on one "
                            "arithmetic: run the rest on a CPU of that kind, or pass --any-cpu to run them here (a float32 "
                            "sweep, trainer.precision: 32-true, runs on any kind)")


def run_stable_repeats(grid: list[Point], spec: dict, jobs: int, runs: dict[str, Path],
                       when_done: WhenDone) -> dict[str, str | None]:
    """`grid_seeds_cover: stable`: run each line's stable range under the grid seeds, growing it
    (lm_opt.study.sweep_repeats) until both ends are bracketed or a point crashed."""
    results: dict[str, str | None] = {}
    while True:
        repeats = [p for seed in spec["grid_seeds"] for p in stable_repeats(grid, seed, spec["report"]["margin"])]
        for point in repeats:
            validate(point)
        todo = prepare(repeats, spec, runs, when_done)
        print(f"seeds {spec['grid_seeds']} over each line's stable range: {len(repeats) - len(todo)} runs done, "
              f"{len(todo)} to run", flush=True)
        if not todo or any(results.get(p.name) for p in todo):
            return results
        results.update(execute(todo, jobs, when_done))


def run_sweep(spec_path: str, jobs: int = 1, slurm: bool = False, dry_run: bool = False,
              commit: bool = False, reuse: bool = True, any_cpu: bool = False,
              drop_checkpoints: bool = False) -> dict[str, str | None]:
    """Plan, validate, then run (or write the Slurm script for) a sweep; returns point -> problem or None."""
    if jobs < 1:
        raise SpecError(f"--jobs must be >= 1, got {jobs}")
    spec = load_spec(spec_path)
    grid = plan(spec)
    whole = spec["grid_seeds_cover"] == "grid"
    repeats = [with_seed(p, seed) for seed in spec["grid_seeds"] for p in grid]
    points = grid + (repeats if whole else [])
    if slurm and not whole:
        raise SpecError("grid_seeds_cover: stable grows each line's repeats from the finished runs, in rounds; "
                        "run the sweep without --slurm, or set grid_seeds_cover: grid")
    print(f"sweep {spec['name']}: {len(points)} points in {spec['out_dir']}; checking every point's config", flush=True)
    for point in points:
        validate(point)
    if dry_run:
        for p in points:
            print(f"{point_state(p.run_dir):>6}  {p.name}\n        python -m lm_opt {shlex.join(p.fit_args())}")
        if spec["seeds"]:
            print(f"then each line's best point with seeds {spec['seeds']}, once its grid is done")
        if not whole:
            print(f"then each line's stable lr range and the point beyond each end with seeds {spec['grid_seeds']}")
        return {}
    spec["out_dir"].mkdir(parents=True, exist_ok=True)
    (spec["out_dir"] / SPEC_FILE).write_text(Path(spec_path).read_text())
    if slurm:
        prepare(points, spec)
        seeds = seed_points(grid, spec["seeds"])
        prepare(seeds, spec)
        print(f"wrote {write_slurm(points + seeds, spec)} ({len(points + seeds)} tasks); submit it with sbatch"
              + (f"; {len(seeds)} of them are seed repeats, the others come once the grid is done"
                 if spec["seeds"] else ""))
        return {}
    if not gpu_slots() and not any_cpu:
        check_one_cpu_kind(grid + repeats)
    runs = known_runs(spec["out_dir"].parent, threads_per_job(jobs)) if reuse and not gpu_slots() else {}
    when_done = WhenDone(commit, drop_checkpoints)
    todo = prepare(points, spec, runs, when_done)
    print(f"{len(points) - len(todo)} points already done, {len(todo)} to run", flush=True)
    results = execute(todo, jobs, when_done) if todo else {}
    if spec["seeds"]:
        seeds = seed_points(grid, spec["seeds"])
        todo = prepare(seeds, spec, runs, when_done)
        print(f"seeds {spec['seeds']} at each line's best point: {len(seeds) - len(todo)} runs already done, "
              f"{len(todo)} to run", flush=True)
        results.update(execute(todo, jobs, when_done) if todo else {})
    if not whole:
        results.update(run_stable_repeats(grid, spec, jobs, runs, when_done))
    for name, problem in results.items():
        if problem:
            print(f"CRASHED {name}: {problem}; log: {spec['out_dir'] / name / LOG_FILE}; rerun the sweep to retry")
    write_report(spec["out_dir"], **spec["report"])
    return results


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 2 for a bad spec (nothing ran), 1 if a point crashed, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m lm_opt sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="sweep spec YAML, e.g. configs/sweeps/tiny_cpu.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (one per GPU where there are GPUs)")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each point's record (not its checkpoints) as soon as it is done")
    parser.add_argument("--drop-checkpoints", action="store_true",
                        help="delete each done point's checkpoints once its record is written (and committed): "
                             "for a long sweep on a small disk; an unfinished point keeps its last.ckpt to resume")
    parser.add_argument("--slurm", action="store_true",
                        help="write out_dir/sweep.sbatch (an array job) instead of running")
    parser.add_argument("--no-reuse", action="store_true",
                        help="run every point, even one another sweep here already ran (lm_opt.study.reuse)")
    parser.add_argument("--dry-run", action="store_true", help="check the spec and print the points and commands")
    parser.add_argument("--any-cpu", action="store_true",
                        help="run points here even where the sweep's done runs were made on another kind of CPU")
    args = parser.parse_args(argv)
    with command_endings("sweep"):
        results = run_sweep(args.spec, args.jobs, args.slurm, args.dry_run, args.commit, not args.no_reuse,
                            args.any_cpu, args.drop_checkpoints)
    if any(results.values()):
        raise SystemExit(1)
