"""Steps to a target loss (the SOAP paper's and AlgoPerf's measure), read off validation curves.

A run's `summary.json` holds its validation curve, `val_curve`: [step, loss] at each validation.
The steps a run needs to reach a target loss are where that curve first falls to the target,
interpolated linearly between the two validations around the crossing: the curve is only known
at validations, so the answer is as fine as `val_check_interval`. A run whose first validation
is already at or below the target counts as reaching it there (an upper bound).

The target is a number, or a named setup of the sweep: the mean final loss over the seeds of
that setup's best point (its best point's final loss where it has no seeds).
"""

from typing import Any

from lm_opt.study.sweep_plan import format_value


def steps_to_target(curve: list[list[float]] | None, target: float) -> float | None:
    """First step at which the piecewise-linear validation curve reaches `target`; None if never."""
    previous = None
    for step, loss in curve or []:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (s0, l0) = previous
            return s0 + (step - s0) * (l0 - target) / (l0 - loss)
        previous = (step, loss)
    return None


def target_loss(target: str, stable: list[dict], noise: dict[tuple, dict]) -> tuple[float, str]:
    """The target as a loss, and how it was set; a named setup is that optimizer's line with no condition
    (or its only line)."""
    try:
        return float(target), f"{float(target):.4f} nats (given)"
    except ValueError:
        pass
    lines = [s for s in stable if s["optimizer"] == target and "best_loss" in s]
    if not lines:
        known = sorted({s["optimizer"] for s in stable})
        raise ValueError(f"--target {target!r}: not a number and not a setup of this sweep with a finished point; "
                         f"setups: {known}")
    line = next((s for s in lines if not s["condition"]), lines[0])
    stats = noise.get((line["optimizer"], line["condition"], format_value(line["best_x"])))
    if stats and "mean" in stats:
        return stats["mean"], f"{target}'s mean final loss over {stats['n']} seeds, {stats['mean']:.4f} nats"
    return line["best_loss"], f"{target}'s best final loss, {line['best_loss']:.4f} nats (no seeds)"


def time_to_target(lines: list[tuple[dict, list[dict]]], target: float, reference: str | None) -> list[dict]:
    """Per line (its stability entry and the runs of its best point, seeds included): the steps to
    `target` (mean and range over the runs that reach it), that as a fraction of the run's steps,
    the median step time, and optimizer state per parameter; step time also as a ratio to the
    reference setup's, and the wall clock to the target as a ratio to the reference's whole run."""
    out = []
    for line, runs in lines:
        runs = [r for r in runs if r["status"] == "finished"]
        reached = [x for x in (steps_to_target(r.get("val_curve"), target) for r in runs) if x is not None]
        step_times = sorted(r["step_time_s"] for r in runs if r.get("step_time_s"))
        per_param = [r["optimizer_state_bytes"] / r["parameters"] for r in runs
                     if r.get("optimizer_state_bytes") is not None and r.get("parameters")]
        entry: dict[str, Any] = {"optimizer": line["optimizer"], "condition": line["condition"],
                                 "best_x": line["best_x"], "runs": len(runs), "reached": len(reached),
                                 "max_steps": runs[0]["max_steps"] if runs else None}
        if reached:
            entry.update(mean=sum(reached) / len(reached), low=min(reached), high=max(reached))
            if entry["max_steps"]:
                entry["fraction"] = entry["mean"] / entry["max_steps"]
        if step_times:
            entry["step_time_s"] = step_times[len(step_times) // 2]
        if per_param:
            entry["state_bytes_per_param"] = per_param[0]
        out.append(entry)
    ref = next((e for e in out if e["optimizer"] == reference and not e["condition"]), None)
    for e in out:
        if ref and ref.get("step_time_s") and e.get("step_time_s"):
            e["step_time_ratio"] = e["step_time_s"] / ref["step_time_s"]
            if "mean" in e and ref["max_steps"]:
                e["time_ratio"] = e["mean"] * e["step_time_ratio"] / ref["max_steps"]
    return out
