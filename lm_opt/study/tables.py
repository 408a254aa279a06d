"""The report's tables: `results.csv` (every run) and `results.md` (each line's best point over
seeds, steps to target, every run, stability, and the comparison with another sweep)."""

import csv
import json
from pathlib import Path
from typing import Any

from lm_opt.record import LOG_FILE
from lm_opt.study.rows import FIELDS, Row, ran_here, series_key, show, swept_axes
from lm_opt.study.stats import REFERENCE, best_of_line, ranges_apart, seed_noise, stability
from lm_opt.study.target import target_section


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_csv(rows: list[Row], path: Path) -> None:
    axes = swept_axes(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["point", "optimizer", *axes, "seed", *FIELDS])
        for r in rows:
            values = [json.dumps(v) if isinstance(v, dict) else v for v in (r.values.get(a, "") for a in axes)]
            seed = "" if r.seed is None else r.seed
            writer.writerow([r.point, r.optimizer, *values, seed, *(getattr(r, k) for k in FIELDS)])


def compute_line(rows: list[Row]) -> str:
    """What rerunning the sweep costs: the summed wall time of the runs it ran itself (records
    copied from another sweep cost nothing to rerun)."""
    ran, copied = ran_here(rows)
    hours = sum(r.wall_time_s for r in ran) / 3600
    return (f"Compute: {len(ran)} runs ran here, {hours:.2f} h of wall time summed over them (the sweep's "
            f"own clock is that over `--jobs`); {copied} copied from another sweep's records.")


def heading(rows: list[Row], base: dict | None) -> list[str]:
    """The sweep's name, its runs by status, what rerunning it costs, and its baseline."""
    counts = {s: sum(r.status == s for r in rows) for s in dict.fromkeys(r.status for r in rows)}
    lines = [f"# Sweep {rows[0].sweep}", "",
             f"{len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             compute_line(rows), ""]
    if base:
        lines += [f"Baseline: the unigram cross-entropy of the validation set is **{base['unigram_val_loss']:.4f}** "
                  f"nats (token frequencies of the {base['train_tokens']:,} training tokens, add-{base['smoothing']} "
                  f"smoothing, on the {base['val_targets']:,} validation targets); `vs unigram` is each loss minus "
                  "it.", ""]
    return lines


def findings_table(found: list[dict], base: dict | None) -> list[str]:
    """Each line's best point over its seeds, against the reference optimizer's."""
    if not found:
        return []
    lines = ["## Best point per optimizer, over seeds", "",
             f"Mean, standard deviation and range of the final val loss over the seeds of each line's best "
             f"point. A difference from {REFERENCE} counts as shown only where the two seed ranges do not "
             "overlap.", "",
             "| optimizer | condition | best value | seeds | mean | std | range | vs unigram | "
             f"vs {REFERENCE} | beyond seed noise |", "|" + " --- |" * 10]
    for f in found:
        delta = "" if "delta" not in f else f"{f['delta']:+.4f}"
        beyond = "" if "delta" not in f else ("yes" if f["beyond_noise"] else "no")
        vs = "" if not base else format(f["mean"] - base["unigram_val_loss"], "+.4f")
        lines.append(f"| {f['optimizer']} | {f['condition']} | {show(f['best_x'])} | {f['n']} | {f['mean']:.4f} "
                     f"| {f['std']:.4f} | {f['min']:.4f} .. {f['max']:.4f} | {vs} | {delta} | {beyond} |")
    return lines + [""]


def runs_table(rows: list[Row], stable: list[dict], base: dict | None) -> list[str]:
    """Every run, each line's best in bold."""
    axes = swept_axes(rows)
    best = {(s["optimizer"], s["condition"]): s.get("best_point") for s in stable}
    lines = ["## Every run", "", "| point | optimizer | " + " | ".join(axes) + " | seed | final val loss | vs unigram "
             "| best val loss | status | steps | tokens | wall time (s) |", "|" + " --- |" * (len(axes) + 10)]
    for r in rows:
        mark = "**" if best.get(series_key(r)) == r.point else ""
        vs = "" if not base or r.final_val_loss is None else f"{r.final_val_loss - base['unigram_val_loss']:+.4f}"
        cells = [r.point, r.optimizer, *(show(r.values[a]) if a in r.values else "" for a in axes),
                 "" if r.seed is None else str(r.seed),
                 f"{mark}{number(r.final_val_loss)}{mark}", vs, number(r.best_val_loss), r.status,
                 f"{number(r.steps)}/{number(r.max_steps)}", number(r.tokens), number(r.wall_time_s, 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def stability_table(stable: list[dict], margin: float) -> list[str]:
    lines = ["", f"## Stability: swept values within {margin} nats of each line's best final val loss", "",
             "| optimizer | condition | axis | best value | best loss | range within margin | width (decades) "
             "| points within / finished / all |", "|" + " --- |" * 8]
    for s in stable:
        span = f"{show(s['low'])} .. {show(s['high'])}" if "low" in s else ""
        decades = "" if s.get("decades") is None else f"{s['decades']:.2f}"
        lines.append(f"| {s['optimizer']} | {s['condition']} | {s['axis']} | {show(s.get('best_x', ''))} "
                     f"| {number(s.get('best_loss'))} | {span} | {decades} "
                     f"| {s.get('within', 0)} / {s['finished']} / {s['points']} |")
    return lines


def per_seed_table(per_seed: list[dict], margin: float) -> list[str]:
    if not per_seed:
        return []
    lines = ["", f"## Stability under each seed: width (decades) of the range within {margin} nats", "",
             "Lines whose whole grid ran with more than one seed; the first width is the grid's own seed.", "",
             "| optimizer | condition | widths | mean | range |", "|" + " --- |" * 5]
    for line in per_seed:
        known = [w for w in line["widths"] if w is not None]
        widths = ", ".join("" if w is None else f"{w:.2f}" for w in line["widths"])
        mean = f"{sum(known) / len(known):.2f}" if known else ""
        span = f"{min(known):.2f} .. {max(known):.2f}" if known else ""
        lines.append(f"| {line['optimizer']} | {line['condition']} | {widths} | {mean} | {span} |")
    return lines


def problems_list(rows: list[Row]) -> list[str]:
    """The runs that neither finished nor diverged, with their error and log."""
    problems = [r for r in rows if r.status not in ("finished", "diverged")]
    if not problems:
        return []
    return ["", "## Not finished", ""] + [
        f"- {r.point}: {r.status}" + (f": {r.error}" if r.error else "") + f" (log: {r.point}/{LOG_FILE})"
        for r in problems]


def across_panels(found: list[dict], per_seed: list[dict], axis: str) -> list[str]:
    """Where the lines are panelled (`report --panel`), each optimizer's verdicts side by side, one
    column per panel: its best point's difference to the reference's in that panel (beyond seed
    noise or not) and its stable width under each grid seed, and whether the verdict is the same in
    every panel."""
    prefix = f"{axis}="

    def order(condition: str) -> tuple:
        tag = condition.removeprefix(prefix)
        return (0, int(tag), "") if tag.isdigit() else (1, 0, tag)

    panels = sorted({e["condition"] for e in found + per_seed if e["condition"].startswith(prefix)}, key=order)
    if not panels:
        return []
    best = {(f["optimizer"], f["condition"]): f for f in found}
    widths = {(w["optimizer"], w["condition"]): w["widths"] for w in per_seed}
    lines = [f"## Across {axis}", "",
             f"Each {axis}'s lines compared among themselves: the difference of each best point's seed mean to "
             f"{REFERENCE}'s at that {axis} (beyond seed noise where the ranges part), then the stable width "
             "under each grid seed.", "",
             "| optimizer | " + " | ".join(panels) + " | same verdict at every " + axis + " |",
             "|" + " --- |" * (len(panels) + 2)]
    for optimizer in dict.fromkeys(f["optimizer"] for f in found if f["optimizer"] != REFERENCE):
        entries = [best.get((optimizer, c)) for c in panels]
        cells = ["" if e is None or "delta" not in e else
                 f"{e['delta']:+.4f} ({'beyond' if e['beyond_noise'] else 'within'} noise)" for e in entries]
        verdicts = {(e["beyond_noise"], e["beyond_noise"] and e["delta"] > 0) for e in entries if e and "delta" in e}
        same = "" if "" in cells else ("yes" if len(verdicts) == 1 else "no")
        lines.append(f"| {optimizer} | " + " | ".join(cells) + f" | {same} |")
    lines += ["", "| optimizer: stable width (decades) per grid seed | " + " | ".join(panels) + " |",
              "|" + " --- |" * (len(panels) + 1)]
    for optimizer in dict.fromkeys(w["optimizer"] for w in per_seed):
        cells = [", ".join("?" if w is None else f"{w:.2f}" for w in widths.get((optimizer, c), [])) for c in panels]
        lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(rows: list[Row], stable: list[dict], found: list[dict], base: dict | None, plots: list[Path],
             margin: float, timed: list[tuple[str, str, list[dict]]] | None = None,
             per_seed: list[dict] | None = None, compared: list[str] | None = None, panel: str | None = None) -> str:
    """results.md: every section in order, the plots last."""
    lines = heading(rows, base) + findings_table(found, base)
    if panel:
        lines += across_panels(found, per_seed or [], panel)
    for section in timed or []:
        lines += target_section(*section, REFERENCE)
    lines += runs_table(rows, stable, base) + stability_table(stable, margin) + per_seed_table(per_seed, margin)
    lines += problems_list(rows)
    lines += ["", *(compared or []), "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def best_cell(line: dict, noise: dict[tuple, dict]) -> tuple[float, dict, str]:
    """A line's best final loss and seed statistics (stats.best_of_line), and the cell that shows both."""
    loss, stats = best_of_line(line, noise)
    seeds = f" ({stats['min']:.4f} .. {stats['max']:.4f}, {stats['n']} seeds)" if "mean" in stats else ""
    return loss, stats, f"{show(line['best_x'])}: {loss:.4f}{seeds}"


def comparison(stable: list[dict], noise: dict[tuple, dict], other: list[Row], margin: float) -> list[str]:
    """Markdown: each line's best point and stable range here (`stable`, seed statistics `noise`) and
    in another sweep of the same grid (an ablation against its base). A difference counts as beyond
    seed noise where both bests ran with several seeds and their ranges do not overlap."""
    theirs = {(s["optimizer"], s["condition"]): s for s in stability(other, margin)}
    their_noise = seed_noise(other)
    name = other[0].sweep
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
            best_cell(mine, noise), best_cell(other_line, their_noise))
        beyond = ""
        if "mean" in my_stats and "mean" in their_stats:
            beyond = "yes" if ranges_apart(my_stats, their_stats) else "no"
        span = [f"{show(s['low'])} .. {show(s['high'])}" if "low" in s else "" for s in (mine, other_line)]
        lines.append(f"| {mine['optimizer']} | {mine['condition']} | {my_cell} | {span[0]} | {their_cell} "
                     f"| {span[1]} | {my_loss - their_loss:+.4f} | {beyond} |")
    return lines + [""]
