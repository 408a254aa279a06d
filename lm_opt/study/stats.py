"""What a sweep's report measures in its rows: each line's stable range, the seed noise at its best
point, and which differences exceed that noise.

Stability (after the study's Fig. 1): the range of the swept value whose final loss lies within
`margin` nats of the line's best, and its width in decades where the line's grid is logarithmic
(an lr, eps; not beta1 from 0 to 0.99, whose range is the measure).

Noise: the seed repeats of each line's best point (`seeds` in the spec) give the mean, standard
deviation and range of its final loss; a difference between two optimizers counts as shown only
where their seed ranges do not overlap. A line's stable range, computed under each seed of a
whole grid run again (`grid_seeds`), gets its own noise the same way.
"""

import math
from dataclasses import replace
from typing import Any

from lm_opt.study.rows import Row, numeric, series_key, x_axis
from lm_opt.study.sweep_plan import DONE, format_value

REFERENCE = "adamw"
"""The optimizer every other is compared with, where the sweep has it."""


def logarithmic(xs: list[Any]) -> bool:
    """Whether values lie on a log axis: all positive, spanning at least a decade."""
    return all(numeric(x) and x > 0 for x in xs) and max(xs) >= 10 * min(xs)


def stability(rows: list[Row], margin: float) -> list[dict]:
    """Per line: the best point and the range of the swept value within `margin` of its final loss."""
    out = []
    rows = [r for r in rows if r.seed is None]  # the grid; seed repeats measure noise
    for key in dict.fromkeys(series_key(r) for r in rows):
        line = [r for r in rows if series_key(r) == key]
        x = x_axis(line[0])
        ok = [r for r in line if r.status == "finished" and r.final_val_loss is not None]
        entry = {"optimizer": key[0], "condition": key[1], "axis": x, "points": len(line), "finished": len(ok),
                 "done": sum(r.status in DONE for r in line), "values": [r.values.get(x) for r in line]}
        if ok:
            best = min(ok, key=lambda r: r.final_val_loss)
            near = [r.values.get(x) for r in ok if r.final_val_loss <= best.final_val_loss + margin]
            entry.update(best_point=best.point, best_x=best.values.get(x), best_loss=best.final_val_loss,
                         within=len(near))
            if near and all(numeric(v) for v in near):
                lo, hi = min(near), max(near)
                log = logarithmic([r.values.get(x) for r in line])
                entry.update(low=lo, high=hi, decades=math.log10(hi / lo) if log else None)
        out.append(entry)
    return out


def stability_per_seed(rows: list[Row], margin: float) -> list[dict]:
    """Where a line's grid ran again with other seeds (a spec's `grid_seeds`): the width of its
    stable range under each seed, the grid's own first. Its spread is that measure's noise. A
    seed's width counts once its runs are done and reach one grid point beyond each end of its
    range (or the grid's end): the whole grid, or its stable range (`grid_seeds_cover: stable`)."""
    out = {(e["optimizer"], e["condition"]): {**e, "widths": [bracketed_width(e, e)]} for e in stability(rows, margin)}
    repeated = set()
    for seed in sorted({r.seed for r in rows if r.seed is not None}):
        for e in stability([replace(r, seed=None) for r in rows if r.seed == seed], margin):
            line = out.get((e["optimizer"], e["condition"]))
            if line is not None and e["points"] > 1:
                line["widths"].append(bracketed_width(e, line, e["values"]))
                repeated.add((e["optimizer"], e["condition"]))
    return [line for key, line in out.items() if key in repeated]


def bracketed_width(entry: dict, grid: dict, run: list[Any] | None = None) -> float | None:
    """`entry`'s width in decades where all its runs are done and, within the line's `grid` values,
    the neighbour beyond each end of its stable range was run (`run`; all of them by default)."""
    if entry["done"] != entry["points"] or entry.get("decades") is None:
        return None
    if run is None:
        return entry["decades"]
    values = sorted(grid["values"])
    lo, hi = values.index(entry["low"]), values.index(entry["high"])
    ends = [values[i] for i in (lo - 1, hi + 1) if 0 <= i < len(values)]
    return entry["decades"] if all(v in run for v in ends) else None


def seed_noise(rows: list[Row]) -> dict[tuple, dict]:
    """(optimizer, condition, x) -> n, mean, std, min, max of the final loss over its seeds,
    where a point ran with more than one seed (every seed must have finished)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((*series_key(r), format_value(r.values.get(x_axis(r)))), []).append(r)
    out = {}
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        losses = [r.final_val_loss for r in runs if r.status == "finished" and r.final_val_loss is not None]
        if len(losses) < len(runs):
            out[key] = {"n": len(runs), "finished": len(losses)}
            continue
        mean = sum(losses) / len(losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in losses) / (len(losses) - 1))
        out[key] = {"n": len(losses), "finished": len(losses), "mean": mean, "std": std,
                    "min": min(losses), "max": max(losses), "x": runs[0].values.get(x_axis(runs[0]))}
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


def best_runs(rows: list[Row], stable: list[dict]) -> list[tuple[dict, list[Row]]]:
    """Each line's stability entry with the runs of its best point: the grid point and its seeds."""
    return [(s, [r for r in rows if series_key(r) == (s["optimizer"], s["condition"])
                 and format_value(r.values.get(x_axis(r))) == format_value(s["best_x"])])
            for s in stable if "best_x" in s]


def best_of_line(line: dict, noise: dict[tuple, dict]) -> tuple[float, dict]:
    """A line's best final loss (the mean over seeds where its best point ran with several) and the
    seed statistics there."""
    stats = noise.get((line["optimizer"], line["condition"], format_value(line["best_x"])), {})
    return stats.get("mean", line["best_loss"]), stats
