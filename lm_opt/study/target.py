"""Steps to a target loss (the SOAP paper's and AlgoPerf's measure), read off validation curves.

A run's summary holds its validation curve, `val_curve`: [step, loss] at each validation.
The steps a run needs to reach a target loss are where that curve first falls to the target,
interpolated linearly between the two validations around the crossing: the curve is only known
at validations, so the answer is as fine as `val_check_interval`. A run whose first validation
is already at or below the target counts as reaching it there (an upper bound).

The target is a number, or a named setup of the sweep: the mean final loss over the seeds of
that setup's best point (its best point's final loss where it has no seeds). `report` writes a
section per target and draws the curves (`plot_curves.png`).
"""

from pathlib import Path
from typing import Any

from lm_opt.study.rows import Row
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


def time_to_target(lines: list[tuple[dict, list[Row]]], target: float, reference: str | None,
                   condition: str = "") -> list[dict]:
    """Per line (its stability entry and the runs of its best point, seeds included): the steps to
    `target` (mean and range over the runs that reach it), that as a fraction of the run's steps,
    the median step time, and optimizer state per parameter; step time also as a ratio to the
    reference setup's (its line under `condition`), and the wall clock to the target as a ratio to
    the reference's whole run."""
    out = []
    for line, runs in lines:
        runs = [r for r in runs if r.status == "finished"]
        reached = [x for x in (steps_to_target(r.val_curve, target) for r in runs) if x is not None]
        step_times = sorted(r.step_time_s for r in runs if r.step_time_s)
        per_param = [r.optimizer_state_bytes / r.parameters for r in runs
                     if r.optimizer_state_bytes is not None and r.parameters]
        entry: dict[str, Any] = {"optimizer": line["optimizer"], "condition": line["condition"],
                                 "best_x": line["best_x"], "runs": len(runs), "reached": len(reached),
                                 "max_steps": runs[0].max_steps if runs else None}
        if reached:
            entry.update(mean=sum(reached) / len(reached), low=min(reached), high=max(reached))
            if entry["max_steps"]:
                entry["fraction"] = entry["mean"] / entry["max_steps"]
        if step_times:
            entry["step_time_s"] = step_times[len(step_times) // 2]
        if per_param:
            entry["state_bytes_per_param"] = per_param[0]
        out.append(entry)
    ref = next((e for e in out if e["optimizer"] == reference and e["condition"] == condition), None)
    for e in out:
        if ref and ref.get("step_time_s") and e.get("step_time_s"):
            e["step_time_ratio"] = e["step_time_s"] / ref["step_time_s"]
            if "mean" in e and ref["max_steps"]:
                e["time_ratio"] = e["mean"] * e["step_time_ratio"] / ref["max_steps"]
    return out


def validation_interval(rows: list[Row]) -> str:
    """`every 20 steps` where every curve validates at one interval (the last gap may be shorter)."""
    gaps = set()
    for r in rows:
        pairs = list(zip(r.val_curve or [], (r.val_curve or [])[1:]))
        gaps |= {b[0] - a[0] for a, b in pairs[:-1] or pairs}
    return f"every {gaps.pop():g} steps" if len(gaps) == 1 else "at the runs' validations"


def target_section(described: str, every: str, timed: list[dict], reference: str) -> list[str]:
    """The report's section for one target: the text that says how it was read, and the table."""
    lines = [f"## Steps to target: {described.split(',')[0]}", "",
             f"Target: {described}. For each line's best point and its seeds, the step at which the validation "
             f"curve first reaches the target, interpolated linearly between validations ({every}; the answer is no "
             "finer than that). Mean and range over the runs that reach it; the fraction is of the run's steps. Step "
             f"time is the median wall time of a training step in those runs; its ratio divides by {reference}'s. "
             f"Time to target is steps to target x step time, over {reference}'s whole run.",
             "", "| optimizer | condition | best value | reached / runs | steps to target | range | fraction of "
             "the run | step time (ms) | vs " + reference + f" | time to target vs {reference}'s run "
             "| optimizer state (bytes/param) |", "|" + " --- |" * 11]
    for e in timed:
        mean = f"{e['mean']:.0f}" if "mean" in e else "not reached"
        span = f"{e['low']:.0f} .. {e['high']:.0f}" if "mean" in e else ""
        fraction = f"{e['fraction']:.2f}" if "fraction" in e else ""
        ms = f"{1e3 * e['step_time_s']:.0f}" if "step_time_s" in e else ""
        ratio = f"{e['step_time_ratio']:.2f}" if "step_time_ratio" in e else ""
        time_ratio = f"{e['time_ratio']:.2f}" if "time_ratio" in e else ""
        state = f"{e['state_bytes_per_param']:.1f}" if "state_bytes_per_param" in e else ""
        lines.append(f"| {e['optimizer']} | {e['condition']} | {format_value(e['best_x'])} "
                     f"| {e['reached']} / {e['runs']} "
                     f"| {mean} | {span} | {fraction} | {ms} | {ratio} | {time_ratio} | {state} |")
    return lines + [""]


def plot_curves(lines: list[tuple[dict, list[Row]]], path: Path, targets: list[float],
                unigram: float | None, title: str | None = None) -> bool:
    """Validation loss against steps for each line's best point (seeds thin), the targets dashed;
    titled by `title` or the first run's sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(s, r) for s, runs in lines for r in runs if len(r.val_curve or []) > 1]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = dict.fromkeys((s["optimizer"], s["condition"]) for s, _ in drawn)
    colors = {key: f"C{i % 10}" for i, key in enumerate(keys)}
    for s, r in drawn:
        key = (s["optimizer"], s["condition"])
        steps, losses = zip(*r.val_curve)
        seed = r.seed is not None
        ax.plot(steps, losses, color=colors[key], lw=0.8 if seed else 1.8, alpha=0.6 if seed else 1,
                label=None if seed else " ".join(filter(None, [s["optimizer"], s["condition"],
                                                                 format_value(s["best_x"])])))
    for target in targets:
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target ({target:.3f})")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", lw=1.5, label=f"unigram baseline ({unigram:.3f})")
    finals = [r.val_curve[-1][1] for _, r in drawn]
    ax.set_ylim(min(finals) - 0.1, max(max(finals) + 0.6, (unigram or 0) + 0.2))
    ax.set(xlabel="step", ylabel="validation loss", title=f"{title or drawn[0][1].sweep}: best point per line (thin: seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
