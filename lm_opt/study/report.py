"""`python -m lm_opt report SWEEP_DIR [--margin 0.05] [--target adamw ...] [--compare SWEEP_DIR ...]`: a
sweep's table, plots, stability and steps to target losses.

Reads the point folders alone (lm_opt.record): each one's point record (optimizer and swept
values, written by `sweep`) and its run's summary. A folder with a summary alone (a run made by
hand) counts as a point of its first optimizer's class at its lr. Writes `results.csv`,
`results.md` and one `plot_<axis>.png` per swept axis: final validation loss against the
swept value, one line per optimizer and per value of the other axes (e.g. qk_norm), the best
point of each line a star, diverged points an x at the top of the axes.

Stability (after the study's Fig. 1): the range of the swept value whose final loss lies
within `margin` nats of the line's best, and its width in decades where the line's grid is
logarithmic (an lr, eps; not beta1 from 0 to 0.99, whose range is the measure).

Steps to target (lm_opt.study.target): for each line's best point and its seeds, the steps at
which its validation curve first reaches a target loss (by default the reference optimizer's
mean final loss), with its median step time and optimizer state per parameter;
`plot_curves.png` draws those curves.

Every figure carries its baseline and its noise. The baseline is the unigram cross-entropy of
the runs' validation set (lm_opt.study.baseline), drawn as a horizontal line. The noise comes from
the seed repeats of each line's best point (`seeds` in the spec): their mean, standard
deviation and range, drawn as error bars; a difference between two optimizers counts as shown
only where their seed ranges do not overlap.
"""

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lm_opt.errors import UserError
from lm_opt.record import (LOG_FILE, POINT_FILE, RESULTS_CSV, RESULTS_MD, SUMMARY_FILE, PointRecord, launched,
                           read_baseline, read_config, read_point, read_summary, write_baseline)
from lm_opt.study.sweep_plan import DONE, format_value, short_name
from lm_opt.study.target import plot_curves, target_loss, target_section, time_to_target, validation_interval

REFERENCE = "adamw"
"""The optimizer every other is compared with, where the sweep has it."""
FIELDS = ("final_val_loss", "best_val_loss", "status", "steps", "max_steps", "tokens", "wall_time_s", "step_time_s",
          "error")
CURVE_FIELDS = ("val_curve", "optimizer_state_bytes", "parameters")
"""Read from the summary for steps to target; not in results.csv."""


def show(value: Any) -> str:
    """A swept value for tables and legends; a paired axis' mapping as `qk_norm=false, z_loss=0`."""
    if isinstance(value, dict):
        return ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in value.items())
    return format_value(value)


def read_row(run_dir: Path) -> dict | None:
    """One row: point, optimizer, swept values and the run's summary (status `incomplete` or
    `not run` where there is none)."""
    summary, point = read_summary(run_dir), read_point(run_dir)
    if point is None and summary.status is None:
        return None
    if point is None:
        point = infer_point(run_dir.name, summary.config or {})
    status = summary.status or ("incomplete" if launched(run_dir) else "not run")
    values = dict(point.values)
    row = {"point": point.name, "optimizer": point.optimizer, "seed": values.pop("seed", None),
           "values": values, "shared": point.shared, "sweep": point.sweep or run_dir.parent.name,
           "run_dir": run_dir, "copied": point.copied_from is not None}
    row.update({k: getattr(summary, k) for k in FIELDS + CURVE_FIELDS}, status=status)
    return row


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


def load_rows(sweep_dir: Path) -> list[dict]:
    """The points, ordered by optimizer, line and swept value."""
    rows = [read_row(d) for d in sorted(Path(sweep_dir).iterdir()) if d.is_dir()]
    rows = [r for r in rows if r is not None]

    def order(row: dict) -> tuple:
        x = row["values"].get(x_axis(row))
        return (*series_key(row), (0, x, "") if numeric(x) else (1, 0, str(x)), row["seed"] or 0)

    return sorted(rows, key=order)


def axes_of(rows: list[dict]) -> list[str]:
    """Every swept axis, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["values"]))


def x_axis(row: dict) -> str | None:
    """The axis a row is plotted against: its optimizer's first own axis, else the first shared."""
    own = [k for k in row["values"] if k not in row["shared"]]
    return (own or list(row["values"]) or [None])[0]


def series_key(row: dict) -> tuple[str, str]:
    """(optimizer, the other axes' values): one line of a plot, one row of the stability table."""
    x = x_axis(row)
    rest = "; ".join(show(v) if isinstance(v, dict) else f"{k}={show(v)}" for k, v in row["values"].items() if k != x)
    return row["optimizer"], rest


def numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def logarithmic(xs: list[Any]) -> bool:
    """Whether values lie on a log axis: all positive, spanning at least a decade."""
    return all(numeric(x) and x > 0 for x in xs) and max(xs) >= 10 * min(xs)


def stability(rows: list[dict], margin: float) -> list[dict]:
    """Per line: the best point and the range of the swept value within `margin` of its final loss."""
    out = []
    rows = [r for r in rows if r["seed"] is None]  # the grid; seed repeats measure noise
    for key in dict.fromkeys(series_key(r) for r in rows):
        line = [r for r in rows if series_key(r) == key]
        x = x_axis(line[0])
        ok = [r for r in line if r["status"] == "finished" and r["final_val_loss"] is not None]
        entry = {"optimizer": key[0], "condition": key[1], "axis": x, "points": len(line), "finished": len(ok),
                 "done": sum(r["status"] in DONE for r in line)}
        if ok:
            best = min(ok, key=lambda r: r["final_val_loss"])
            near = [r["values"].get(x) for r in ok if r["final_val_loss"] <= best["final_val_loss"] + margin]
            entry.update(best_point=best["point"], best_x=best["values"].get(x), best_loss=best["final_val_loss"],
                         within=len(near))
            if near and all(numeric(v) for v in near):
                lo, hi = min(near), max(near)
                log = logarithmic([r["values"].get(x) for r in line])
                entry.update(low=lo, high=hi, decades=math.log10(hi / lo) if log else None)
        out.append(entry)
    return out


def stability_per_seed(rows: list[dict], margin: float) -> list[dict]:
    """Where a line's whole grid ran again with other seeds (a spec's `grid_seeds`): the width of its
    stable range under each seed, the grid's own first, once that seed's grid is done. Their spread
    is that measure's noise."""
    def width(e: dict) -> float | None:
        return e.get("decades") if e["done"] == e["points"] else None

    out = {(e["optimizer"], e["condition"]): {**e, "widths": [width(e)]} for e in stability(rows, margin)}
    repeated = set()
    for seed in sorted({r["seed"] for r in rows if r["seed"] is not None}):
        for e in stability([dict(r, seed=None) for r in rows if r["seed"] == seed], margin):
            line = out.get((e["optimizer"], e["condition"]))
            if line is not None and e["points"] == line["points"]:
                line["widths"].append(width(e))
                repeated.add((e["optimizer"], e["condition"]))
    return [line for key, line in out.items() if key in repeated]


def seed_noise(rows: list[dict]) -> dict[tuple, dict]:
    """(optimizer, condition, x) -> n, mean, std, min, max of the final loss over its seeds,
    where a point ran with more than one seed (every seed must have finished)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((*series_key(r), format_value(r["values"].get(x_axis(r)))), []).append(r)
    out = {}
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        losses = [r["final_val_loss"] for r in runs if r["status"] == "finished" and r["final_val_loss"] is not None]
        if len(losses) < len(runs):
            out[key] = {"n": len(runs), "finished": len(losses)}
            continue
        mean = sum(losses) / len(losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        out[key] = {"n": len(losses), "finished": len(losses), "mean": mean, "std": std,
                    "min": min(losses), "max": max(losses), "x": runs[0]["values"].get(x_axis(runs[0]))}
    return out


def ranges_apart(a: dict, b: dict) -> bool:
    """Whether two seed ranges (`min`, `max`) do not overlap: a difference beyond seed noise."""
    return a["min"] > b["max"] or a["max"] < b["min"]


def findings(stable: list[dict], noise: dict[tuple, dict]) -> list[dict]:
    """Per line, its best point's seed statistics and the difference from the reference optimizer's
    line under the same condition; `beyond_noise` where the two seed ranges do not overlap."""
    best = {}
    for s in stable:
        stats = noise.get((s["optimizer"], s["condition"], format_value(s.get("best_x"))))
        if stats and "mean" in stats:
            best[(s["optimizer"], s["condition"])] = {**s, **stats}
    out = []
    for (optimizer, condition), entry in best.items():
        ref = best.get((REFERENCE, condition))
        if ref is not None and optimizer != REFERENCE:
            entry["delta"] = entry["mean"] - ref["mean"]
            entry["beyond_noise"] = ranges_apart(entry, ref)
        out.append(entry)
    return sorted(out, key=lambda e: (e["condition"], e["mean"]))


def baseline(sweep_dir: Path, rows: list[dict]) -> dict | None:
    """The unigram baseline of the runs' data (cached in the sweep's folder); None without a run config."""
    cached = read_baseline(sweep_dir)
    if cached is not None:
        return cached
    config = next((c for c in map(read_config, (r["run_dir"] for r in rows)) if c is not None), None)
    if config is None:
        return None
    from lm_opt.study.baseline import data_baseline

    result = {**data_baseline(config["data"]), "data": config["data"]}
    write_baseline(sweep_dir, result)
    return result


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    axes = axes_of(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", "optimizer", *axes, "seed", *FIELDS])
        for r in rows:
            values = [json.dumps(v) if isinstance(v, dict) else v for v in (r["values"].get(a, "") for a in axes)]
            seed = "" if r["seed"] is None else r["seed"]
            writer.writerow([r["point"], r["optimizer"], *values, seed, *(r.get(k) for k in FIELDS)])


def ran_here(rows: list[dict]) -> tuple[list[dict], int]:
    """The rows of the runs a sweep ran itself (with a wall time), and how many records it copied
    from another sweep instead: what rerunning it costs."""
    return [r for r in rows if not r["copied"] and r["wall_time_s"] is not None], sum(r["copied"] for r in rows)


def compute_line(rows: list[dict]) -> str:
    """What rerunning the sweep costs: the summed wall time of the runs it ran itself (records
    copied from another sweep cost nothing to rerun)."""
    ran, copied = ran_here(rows)
    hours = sum(r["wall_time_s"] for r in ran) / 3600
    return (f"Compute: {len(ran)} runs ran here, {hours:.2f} h of wall time summed over them (the sweep's "
            f"own clock is that over `--jobs`); {copied} copied from another sweep's records.")


def markdown(rows: list[dict], stable: list[dict], found: list[dict], base: dict | None, plots: list[Path],
             margin: float, timed: list[tuple[str, str, list[dict]]] | None = None,
             per_seed: list[dict] | None = None, compared: list[str] | None = None) -> str:
    axes = axes_of(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
    best = {(s["optimizer"], s["condition"]): s.get("best_point") for s in stable}
    lines = [f"# Sweep {rows[0]['sweep']}", "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             compute_line(rows), ""]
    unigram = base and base["unigram_val_loss"]
    if base:
        lines += [f"Baseline: the unigram cross-entropy of the validation set is **{unigram:.4f}** nats (token "
                  f"frequencies of the {base['train_tokens']:,} training tokens, add-{base['smoothing']} smoothing, "
                  f"on the {base['val_targets']:,} validation targets); `vs unigram` is each loss minus it.", ""]
    if found:
        lines += ["## Best point per optimizer, over seeds", "",
                  f"Mean, standard deviation and range of the final val loss over the seeds of each line's best "
                  f"point. A difference from {REFERENCE} counts as shown only where the two seed ranges do not "
                  "overlap.", "",
                  "| optimizer | condition | best value | seeds | mean | std | range | vs unigram | "
                  f"vs {REFERENCE} | beyond seed noise |", "|" + " --- |" * 10]
        for f in found:
            delta = "" if "delta" not in f else f"{f['delta']:+.4f}"
            beyond = "" if "delta" not in f else ("yes" if f["beyond_noise"] else "no")
            lines.append(f"| {f['optimizer']} | {f['condition']} | {show(f['best_x'])} | {f['n']} | {f['mean']:.4f} "
                         f"| {f['std']:.4f} | {f['min']:.4f} .. {f['max']:.4f} "
                         f"| {'' if not base else format(f['mean'] - unigram, '+.4f')} | {delta} | {beyond} |")
        lines.append("")
    for section in timed or []:
        lines += target_section(*section, REFERENCE)
    lines += ["## Every run", "", "| point | optimizer | " + " | ".join(axes) + " | seed | final val loss | vs unigram "
              "| best val loss | status | steps | tokens | wall time (s) |", "|" + " --- |" * (len(axes) + 10)]
    for r in rows:
        mark = "**" if best.get(series_key(r)) == r["point"] else ""
        vs = "" if not base or r["final_val_loss"] is None else f"{r['final_val_loss'] - unigram:+.4f}"
        cells = [r["point"], r["optimizer"], *(show(r["values"][a]) if a in r["values"] else "" for a in axes),
                 "" if r["seed"] is None else str(r["seed"]),
                 f"{mark}{number(r['final_val_loss'])}{mark}", vs, number(r["best_val_loss"]), r["status"],
                 f"{number(r['steps'])}/{number(r['max_steps'])}", number(r["tokens"]), number(r["wall_time_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"## Stability: swept values within {margin} nats of each line's best final val loss", "",
              "| optimizer | condition | axis | best value | best loss | range within margin | width (decades) "
              "| points within / finished / all |", "|" + " --- |" * 8]
    for s in stable:
        span = f"{show(s['low'])} .. {show(s['high'])}" if "low" in s else ""
        decades = "" if s.get("decades") is None else f"{s['decades']:.2f}"
        lines.append(f"| {s['optimizer']} | {s['condition']} | {s['axis']} | {show(s.get('best_x', ''))} "
                     f"| {number(s.get('best_loss'))} | {span} | {decades} "
                     f"| {s.get('within', 0)} / {s['finished']} / {s['points']} |")
    if per_seed:
        lines += ["", f"## Stability under each seed: width (decades) of the range within {margin} nats", "",
                  "Lines whose whole grid ran with more than one seed; the first width is the grid's own seed.", "",
                  "| optimizer | condition | widths | mean | range |", "|" + " --- |" * 5]
        for line in per_seed:
            known = [w for w in line["widths"] if w is not None]
            widths = ", ".join("" if w is None else f"{w:.2f}" for w in line["widths"])
            mean = f"{sum(known) / len(known):.2f}" if known else ""
            span = f"{min(known):.2f} .. {max(known):.2f}" if known else ""
            lines.append(f"| {line['optimizer']} | {line['condition']} | {widths} | {mean} | {span} |")
    problems = [r for r in rows if r["status"] not in ("finished", "diverged")]
    if problems:
        lines += ["", "## Not finished", ""] + [
            f"- {r['point']}: {r['status']}" + (f": {r['error']}" if r["error"] else "")
            + f" (log: {r['point']}/{LOG_FILE})" for r in problems]
    lines += ["", *(compared or []), "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def labelled(rows: list[dict]) -> list[dict]:
    """Rows with their sweep as one more shared axis: each sweep's own line per optimizer in a plot."""
    return [dict(r, values={**r["values"], "sweep": r["sweep"]}, shared=[*r["shared"], "sweep"]) for r in rows]


def best_of_line(line: dict, noise: dict[tuple, dict]) -> tuple[float, dict, str]:
    """A line's best final loss (the mean over seeds where its best point ran with several), the
    seed statistics there, and the table cell that shows both."""
    stats = noise.get((line["optimizer"], line["condition"], format_value(line["best_x"])), {})
    loss = stats.get("mean", line["best_loss"])
    seeds = f" ({stats['min']:.4f} .. {stats['max']:.4f}, {stats['n']} seeds)" if "mean" in stats else ""
    return loss, stats, f"{show(line['best_x'])}: {loss:.4f}{seeds}"


def comparison(stable: list[dict], noise: dict[tuple, dict], other: list[dict], margin: float) -> list[str]:
    """Markdown: each line's best point and stable range here (`stable`, seed statistics `noise`) and
    in another sweep of the same grid (an ablation against its base). A difference counts as beyond
    seed noise where both bests ran with several seeds and their ranges do not overlap."""
    theirs = {(s["optimizer"], s["condition"]): s for s in stability(other, margin)}
    their_noise = seed_noise(other)
    name = other[0]["sweep"]
    lines = [f"## Against {name}: each line's best and its range within {margin} nats", "",
             f"The difference is this sweep's best final loss minus {name}'s, each the mean over seeds where "
             "the best point ran with several.", "",
             f"| optimizer | condition | best here | range here | best in {name} | range in {name} | difference "
             "| beyond seed noise |", "|" + " --- |" * 8]
    for mine in stable:
        other_line = theirs.get((mine["optimizer"], mine["condition"]))
        if "best_loss" not in mine or not other_line or "best_loss" not in other_line:
            continue
        (my_loss, my_stats, my_cell), (their_loss, their_stats, their_cell) = (
            best_of_line(mine, noise), best_of_line(other_line, their_noise))
        beyond = ""
        if "mean" in my_stats and "mean" in their_stats:
            beyond = "yes" if ranges_apart(my_stats, their_stats) else "no"
        span = [f"{show(s['low'])} .. {show(s['high'])}" if "low" in s else "" for s in (mine, other_line)]
        lines.append(f"| {mine['optimizer']} | {mine['condition']} | {my_cell} | {span[0]} | {their_cell} "
                     f"| {span[1]} | {my_loss - their_loss:+.4f} | {beyond} |")
    return lines + [""]


def best_runs(rows: list[dict], stable: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Each line's stability entry with the runs of its best point: the grid point and its seeds."""
    return [(s, [r for r in rows if series_key(r) == (s["optimizer"], s["condition"])
                 and format_value(r["values"].get(x_axis(r))) == format_value(s["best_x"])])
            for s in stable if "best_x" in s]


def plot(rows: list[dict], axis: str, path: Path, noise: dict[tuple, dict] | None = None,
         unigram: float | None = None) -> bool:
    """Final val loss against `axis` (log scale over more than a decade; a beta on the log scale of
    1 - beta), with the seed range as error bars and the unigram baseline as a line; False if
    nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    rows = [r for r in rows if x_axis(r) == axis and numeric(r["values"].get(axis))
            and r["status"] in ("finished", "diverged") and r["seed"] is None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = blended_transform_factory(ax.transData, ax.transAxes)
    colors = {o: f"C{i % 10}" for i, o in enumerate(dict.fromkeys(r["optimizer"] for r in rows))}
    styles = {c: ("-", "--", ":", "-.")[i % 4] for i, c in enumerate(dict.fromkeys(series_key(r)[1] for r in rows))}
    for optimizer, condition in dict.fromkeys(series_key(r) for r in rows):
        line = sorted((r for r in rows if series_key(r) == (optimizer, condition)), key=lambda r: r["values"][axis])
        ok = [r for r in line if r["status"] == "finished" and r["final_val_loss"] is not None]
        diverged = [r["values"][axis] for r in line if r["status"] == "diverged"]
        if not ok and not diverged:
            continue
        color, label = colors[optimizer], optimizer + (f" ({condition})" if condition else "")
        ax.plot([r["values"][axis] for r in ok], [r["final_val_loss"] for r in ok], styles[condition],
                color=color, marker="o", ms=4, label=label)
        if ok:
            best = min(ok, key=lambda r: r["final_val_loss"])
            ax.plot(best["values"][axis], best["final_val_loss"], "*", color=color, ms=15, mec="black", zorder=3)
        for stats in (v for k, v in (noise or {}).items() if k[:2] == (optimizer, condition) and "mean" in v):
            ax.errorbar(stats["x"], stats["mean"], yerr=[[stats["mean"] - stats["min"]], [stats["max"] - stats["mean"]]],
                        color=color, capsize=5, elinewidth=2, zorder=4)
        ax.plot(diverged, [0.97] * len(diverged), "x", color=color, ms=9, mew=2, transform=top, clip_on=False)
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", lw=1.5, label=f"unigram baseline ({unigram:.3f})")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.08 * (high - low))  # room for the diverged marks
    xs, label = sorted({r["values"][axis] for r in rows}), axis
    if logarithmic(xs):
        ax.set_xscale("log")
    elif "beta" in axis and all(0 <= x < 1 for x in xs):
        # Momentum on the scale of its averaging horizon 1 / (1 - beta): 0, 0.9, 0.99 equally spaced.
        def horizon(b):
            return -np.log10(np.maximum(1 - np.asarray(b), 1e-12))  # matplotlib probes beta = 1

        def beta(h):
            return 1 - 10.0 ** -np.asarray(h)

        pad = 0.05 * (horizon(xs[-1]) - horizon(xs[0]))
        ax.set_xscale("function", functions=(horizon, beta))
        ax.set_xlim(beta(horizon(xs[0]) - pad), beta(horizon(xs[-1]) + pad))
        ax.set_xticks(xs, [show(x) for x in xs])
        label = f"{axis} (spaced by log 1 / (1 - {axis}))"
    ax.set(xlabel=label, ylabel="final validation loss",
           title=f"{rows[0]['sweep']}\nstar = best per line, bars = seed range, x at top = diverged")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # beside the axes: over them it hides the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(sweep_dir: str | Path, margin: float = 0.05, targets: list[str] | None = None,
                 compare: list[str | Path] = ()) -> Path:
    """Write results.csv, results.md and the plots into `sweep_dir`; returns results.md. Each of
    `targets` (a setup's label or a loss) adds steps to that target; they default to the reference
    optimizer where the runs have validation curves. Each sweep in `compare` (the same grid under
    another setup) adds its lines to the plots, dashed, and a table of best points against it."""
    sweep_dir = Path(sweep_dir)
    rows = load_rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no point folders ({POINT_FILE} or {SUMMARY_FILE})")
    write_csv(rows, sweep_dir / RESULTS_CSV)
    base, noise = baseline(sweep_dir, rows), seed_noise(rows)
    unigram = base and base["unigram_val_loss"]
    others = [load_rows(Path(d)) for d in compare]
    if not all(others):
        raise FileNotFoundError(f"a sweep to compare with holds no point folders: {[str(d) for d in compare]}")
    drawn = labelled(rows + [r for other in others for r in other]) if others else rows
    plots = []
    for axis in dict.fromkeys(x_axis(r) for r in rows if x_axis(r)):
        path = sweep_dir / f"plot_{format_value(axis)}.png"
        if plot(drawn, axis, path, seed_noise(drawn), unigram):
            plots.append(path)
    stable = stability(rows, margin)
    found = findings(stable, noise)
    lines, timed, goals = best_runs(rows, stable), [], []
    curves = any(len(r.get("val_curve") or []) > 1 for _, runs in lines for r in runs)
    if not targets and curves and any(s["optimizer"] == REFERENCE for s, _ in lines):
        targets = [REFERENCE]
    for target in targets or []:
        goal, described = target_loss(target, stable, noise)
        goals.append(goal)
        timed.append((described, validation_interval(rows), time_to_target(lines, goal, REFERENCE)))
    if curves and plot_curves(lines, sweep_dir / "plot_curves.png", goals, unigram):
        plots.append(sweep_dir / "plot_curves.png")
    per_seed = stability_per_seed(rows, margin)
    compared = [line for other in others for line in comparison(stable, noise, other, margin)]
    (sweep_dir / RESULTS_MD).write_text(markdown(rows, stable, found, base, plots, margin, timed, per_seed, compared))
    print(f"report: {sweep_dir / RESULTS_MD}, {RESULTS_CSV}, " + ", ".join(p.name for p in plots))
    return sweep_dir / RESULTS_MD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_opt report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a sweep's out_dir, e.g. logs/sweeps/tiny_cpu")
    parser.add_argument("--margin", type=float, default=0.05, help="nats above the best loss that count as stable")
    parser.add_argument("--target", nargs="+", help=f"steps to these losses: a setup's label (its mean final loss "
                                                    f"over seeds) or a number; default {REFERENCE} where the runs "
                                                    "have validation curves")
    parser.add_argument("--compare", nargs="+", default=[], metavar="SWEEP_DIR",
                        help="sweeps of the same grid under another setup (e.g. the base of an ablation): their "
                             "lines join the plots, dashed, and a table compares each line's best")
    args = parser.parse_args(argv)
    try:
        write_report(args.sweep_dir, args.margin, args.target, args.compare)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
