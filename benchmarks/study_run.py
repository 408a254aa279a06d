"""A CPU study run from start to its summary, side by side: wall clock and CPU time per setting.

Each run is the CPU study's command (`python -m lm_opt fit --config configs/quickstart.yaml` with
the sweep's overrides: 200 steps, validation every 50, one DataLoader worker), start-up,
tokenizer and corpus load, validations and checkpoints included. Runs go one at a time, in
alternating order each round, under `OMP_NUM_THREADS=--threads`, so each gets the same machine.
A run is `[REF:]PRECISION[+compile]`: with a git REF it runs that commit's code from a temporary
worktree (the baseline a speed-up is measured against); without one, this checkout's.

    python -m benchmarks.study_run                                   # 32-true against bf16-mixed
    python -m benchmarks.study_run --runs 8783896:32-true bf16-mixed --rounds 2
    python -m benchmarks.study_run --runs 32-true 32-true+compile --width 128 --steps 400   # the ladder's runs
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lm_opt.provenance import cpu_name
from lm_opt.record import SUMMARY_FILE, read_summary

ROOT = Path(__file__).parents[1]
STUDY_OVERRIDES = ["--data.num_workers", "1", "--trainer.val_check_interval", "50",
                   "--trainer.enable_progress_bar", "false"]


def worktree(ref: str, stack: ExitStack) -> Path:
    """A detached checkout of `ref`, removed when `stack` closes."""
    path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="study_run_"))) / ref
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), ref], cwd=ROOT, check=True)
    stack.callback(subprocess.run, ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=True)
    return path


def command(setting: str, steps: int, preset: str, out: Path, width: int | None = None) -> list[str]:
    precision, _, compiled = setting.partition("+")
    return [sys.executable, "-m", "lm_opt", "fit", "--config", "configs/quickstart.yaml", *STUDY_OVERRIDES,
            "--model.preset", preset, "--trainer.max_steps", str(steps), "--trainer.precision", precision,
            *(["--model.compile", "true"] if compiled else []),
            *(["--model.arch", f"{{n_embd: {width}, n_head: {max(1, width // 64)}}}"] if width else []),
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", "run"]


def run_once(code: Path, setting: str, steps: int, preset: str, threads: int, width: int | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + sys of the run and its workers), final val loss, and where
    the wall clock went: start-up (imports, config parsing, model init: until the run record's
    clock starts in setup), the training steps (steps x the median step time, where the record
    has it) and the rest of fit (validation, checkpoints, logging)."""
    with tempfile.TemporaryDirectory(prefix="study_run_logs_") as out:
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command(setting, steps, preset, Path(out), width), cwd=code, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            sys.exit(f"error: {setting} in {code} failed with exit status {result.returncode}:\n{result.stderr[-3000:]}")
        summary = read_summary(Path(out) / "run")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    step_time = summary.step_time_s  # older records lack it
    train = steps * step_time if step_time else float("nan")
    return {"wall": wall, "cpu": cpu, "loss": summary.final_val_loss, "startup": wall - summary.wall_time_s,
            "steps": train, "rest": summary.wall_time_s - train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["32-true", "bf16-mixed"],
                        help="[REF:]PRECISION[+compile]; ratios are against the first")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="as each run of a CPU sweep with --jobs 2")
    parser.add_argument("--preset", default="cpu", help="the study's model; `tiny` for a smoke run")
    parser.add_argument("--width", type=int, help="the preset at this width, heads of 64 (cpu_scale's widths)")
    args = parser.parse_args()
    with ExitStack() as stack:
        code = {}
        for run in args.runs:
            ref, _, _ = run.rpartition(":")
            code[run] = worktree(ref, stack) if ref else ROOT
        measured: dict[str, list[dict[str, float]]] = {run: [] for run in args.runs}
        for round_ in range(args.rounds):
            for run in args.runs[:: 1 if round_ % 2 == 0 else -1]:
                measured[run].append(run_once(code[run], run.rpartition(":")[2], args.steps, args.preset,
                                              args.threads, args.width))
                print(f"round {round_ + 1}: {run}: {measured[run][-1]}", file=sys.stderr, flush=True)
    median = {run: {key: statistics.median(m[key] for m in runs) for key in ("wall", "cpu", "startup", "steps", "rest")}
              for run, runs in measured.items()}
    first = median[args.runs[0]]
    print(f"CPU study run ({args.preset} preset{f' at width {args.width}' if args.width else ''}, {args.steps} steps, start to {SUMMARY_FILE}), {args.threads} thread(s), "
          f"{cpu_name()}, load average {os.getloadavg()[0]:.1f} at the end; medians of {args.rounds} alternating rounds\n")
    print("| run | wall s | CPU s | final val loss | speed-up: wall | speed-up: CPU |\n| --- | --- | --- | --- | --- | --- |")
    for run, runs in measured.items():
        losses = ", ".join(f"{m['loss']:.4f}" for m in runs)
        print(f"| {run} | {median[run]['wall']:.0f} | {median[run]['cpu']:.0f} | {losses} | "
              f"{first['wall'] / median[run]['wall']:.2f}x | {first['cpu'] / median[run]['cpu']:.2f}x |")
    print(f"\nWhere the wall clock goes (s, medians): start-up until fit's setup; {args.steps} x the median "
          "step time; the rest of fit (validation, checkpoints, logging)\n")
    print("| run | start-up | training steps | rest of fit |\n| --- | --- | --- | --- |")
    for run in measured:
        m = median[run]
        steps, rest = (f"{m[key]:.1f}" if m[key] == m[key] else "not recorded" for key in ("steps", "rest"))
        print(f"| {run} | {m['startup']:.1f} | {steps} | {rest} |")


if __name__ == "__main__":
    main()
