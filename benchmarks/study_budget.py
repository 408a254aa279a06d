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
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).parents[1]
CPU_STUDY = ("cpu_study", "cpu_lr", "cpu_beta1", "cpu_adamw_hparams", "cpu_frozen_adalayer", "cpu_lr_no_qk_norm",
             "cpu_hybrids_1000")


def ran_here(sweep_dir: Path) -> tuple[list[dict], int]:
    """The summaries of the points this sweep ran itself, and how many it copied."""
    ran, copied = [], 0
    for point_file in sorted(sweep_dir.glob("*/point.json")):
        summary_file = point_file.with_name("summary.json")
        if "copied_from" in json.loads(point_file.read_text()):
            copied += 1
        elif summary_file.is_file():
            ran.append(json.loads(summary_file.read_text()))
    return ran, copied


def cost(summaries: list[dict]) -> tuple[float, float]:
    """Seconds as recorded, and undisturbed: finished runs at the sweep's 10th-percentile wall time."""
    recorded = sum(s["wall_time_s"] for s in summaries)
    finished = sorted(s["wall_time_s"] for s in summaries if s["status"] == "finished")
    quiet_run = statistics.quantiles(finished, n=10)[0] if len(finished) > 1 else sum(finished)
    undisturbed = len(finished) * quiet_run + sum(s["wall_time_s"] for s in summaries if s["status"] != "finished")
    return recorded, undisturbed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=CPU_STUDY, help="sweep names under logs/sweeps")
    parser.add_argument("--jobs", type=int, default=2, help="points run at once (the specs' shipped commands: 2)")
    args = parser.parse_args(argv)
    print("| sweep | runs | copied | recorded (h) | undisturbed (h) |\n| --- | --- | --- | --- | --- |")
    totals = [0.0, 0.0]
    for name in args.specs:
        summaries, copied = ran_here(ROOT / "logs" / "sweeps" / name)
        recorded, undisturbed = cost(summaries)
        totals = [totals[0] + recorded, totals[1] + undisturbed]
        print(f"| {name} | {len(summaries)} | {copied} | {recorded / 3600:.2f} | {undisturbed / 3600:.2f} |")
    print(f"\nsummed over the runs: {totals[0] / 3600:.2f} h recorded, {totals[1] / 3600:.2f} h undisturbed; "
          f"at --jobs {args.jobs} on this machine: {totals[0] / 3600 / args.jobs:.2f} h and "
          f"{totals[1] / 3600 / args.jobs:.2f} h of wall clock")


if __name__ == "__main__":
    main()
