"""What rerunning the CPU study from its shipped commands costs, read off the committed records.

A fresh rerun runs every point whose record was not copied from another sweep (`sweep` copies a
record only from an identical run already on the machine), so its cost is the wall time those
points took. Their recorded wall times include any load the machine carried while they ran (the
test suite, benchmarks); the undisturbed estimate charges each finished run its sweep's 10th
percentile instead, and each diverged run what it took (it stops early).

    python -m benchmarks.study_budget                       # the specs of the CPU study, --jobs 2
    python -m benchmarks.study_budget cpu_lr cpu_beta1 --jobs 1
"""

import argparse
import statistics
from pathlib import Path

from lm_opt.study.rows import Row, load_rows, ran_here

ROOT = Path(__file__).parents[1]
CPU_STUDY = ("cpu_study", "cpu_lr", "cpu_beta1", "cpu_adamw_hparams", "cpu_frozen_adalayer", "cpu_lr_no_qk_norm",
             "cpu_hybrids_1000")


def cost(runs: list[Row]) -> tuple[float, float]:
    """Seconds as recorded, and undisturbed: finished runs at the sweep's 10th-percentile wall time."""
    recorded = sum(r.wall_time_s for r in runs)
    finished = sorted(r.wall_time_s for r in runs if r.status == "finished")
    quiet_run = statistics.quantiles(finished, n=10)[0] if len(finished) > 1 else sum(finished)
    undisturbed = len(finished) * quiet_run + sum(r.wall_time_s for r in runs if r.status != "finished")
    return recorded, undisturbed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=CPU_STUDY, help="sweep names under logs/sweeps")
    parser.add_argument("--jobs", type=int, default=2, help="points run at once (the specs' shipped commands: 2)")
    args = parser.parse_args(argv)
    print("| sweep | runs | copied | recorded (h) | undisturbed (h) |\n| --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for name in args.specs:
        runs, copied = ran_here(load_rows(ROOT / "logs" / "sweeps" / name))
        recorded, undisturbed = cost(runs)
        totals = [totals[0] + recorded, totals[1] + undisturbed]
        print(f"| {name} | {len(runs)} | {copied} | {recorded / 3600:.2f} | {undisturbed / 3600:.2f} |")
    print(f"\nsummed over the runs: {totals[0] / 3600:.2f} h recorded, {totals[1] / 3600:.2f} h undisturbed; "
          f"at --jobs {args.jobs} on this machine: {totals[0] / 3600 / args.jobs:.2f} h and "
          f"{totals[1] / 3600 / args.jobs:.2f} h of wall clock")


if __name__ == "__main__":
    main()
