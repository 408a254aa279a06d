"""An optimizer card's measures, figures and `card.md`, read from its run folders and the baselines'
with the report's statistics (lm_opt.study.report, lm_opt.study.target); see lm_opt.study.card.

Every number of the card names the records it comes from; a baseline of another CPU kind or
precision is never compared (lm_opt.study.card_plan.baseline_usable).
"""

import re
from pathlib import Path

from lm_opt.precision import cpu_arithmetic, describe
from lm_opt.provenance import optimizer_packages
from lm_opt.record import SUMMARY_FILE
from lm_opt.study.card_horizons import horizon_section
from lm_opt.study.card_plan import ADAMW_YAML, REFERENCE, loss_at, loss_verdict, stability_verdict
from lm_opt.study.plots import plot
from lm_opt.study.report import baseline
from lm_opt.study.rows import labelled, load_rows, show
from lm_opt.study.stats import best_runs, seed_noise, stability, stability_per_seed
from lm_opt.study.tables import write_csv
from lm_opt.study.sweep_plan import callback_init_args, format_value
from lm_opt.study.speedup_report import LADDER, card_speedup_lines
from lm_opt.study.target import plot_curves, time_to_target
from lm_opt.user_yaml import read_yaml

STEP_TARGET = 100
"""AdamW's mean loss at this step is the second step target: every comparable optimizer reaches it,
where AdamW's own seeds reach their final mean only near the end."""


def line_stats(rows: list[dict], label: str, margin: float, source: str) -> dict:
    """One optimizer line of a sweep: its stability entry, the seed statistics of its best point,
    its stable width under each grid seed, and the runs of its best point; empty without a point."""
    line = [r for r in rows if r.optimizer == label]
    if not line:
        return {}
    entry = stability(line, margin)[0]
    stats, runs = {}, []
    if "best_x" in entry:
        stats = seed_noise(line).get((label, entry["condition"], format_value(entry["best_x"])), {})
        runs = best_runs(line, [entry])[0][1]
    per_seed = stability_per_seed(line, margin)
    done = entry["done"] == entry["points"]
    widths = per_seed[0]["widths"] if per_seed else [entry.get("decades") if done else None]
    return {"label": label, "source": source, "stable": entry, "stats": stats, "widths": widths, "runs": runs,
            "rows": line}


def cell(line: dict) -> str:
    """`5.62e-03: 5.7010 (5.6870 .. 5.7280, 3 seeds)`."""
    s, stats = line["stable"], line["stats"]
    if "best_x" not in s:
        return "no finished point"
    if "mean" not in stats:
        return f"{show(s['best_x'])}: {s['best_loss']:.4f} (1 seed)"
    return f"{show(s['best_x'])}: {stats['mean']:.4f} ({stats['min']:.4f} .. {stats['max']:.4f}, {stats['n']} seeds)"


def span(line: dict) -> str:
    s = line["stable"]
    if "low" not in s:
        return ""
    widths = ", ".join("?" if w is None else f"{w:.2f}" for w in line["widths"])
    values = [r.values[s["axis"]] for r in line["rows"]]
    # An lr range at the grid's end could go on; beta1's values are the study's whole set.
    edge = s.get("decades") is not None and (s["low"] == min(values) or s["high"] == max(values))
    return (f"{show(s['low'])} .. {show(s['high'])}" + (f"; width {widths} decades (per grid seed)"
                                                       if s.get("decades") is not None else "")
            + (" (reaches the grid's edge: a lower bound)" if edge else ""))


def steps_rows(lines: list[dict], goal: float) -> list[dict]:
    """Steps to `goal` of each line's best point and its seeds (lm_opt.study.target.time_to_target)."""
    return time_to_target([(dict(line["stable"], optimizer=line["label"], condition=line["source"]), line["runs"])
                           for line in lines if line and line["runs"]], goal, None)


def step_cell(e: dict) -> str:
    if "mean" not in e:
        return f"not reached ({e['reached']} / {e['runs']})"
    return f"{e['mean']:.0f} ({e['low']:.0f} .. {e['high']:.0f}, {e['reached']} / {e['runs']} runs)"


def targets(adam: dict) -> list[tuple[float, str]]:
    """AdamW's mean final loss over its best point's seeds, and its mean loss at STEP_TARGET."""
    out = []
    if "mean" in adam["stats"]:
        out.append((adam["stats"]["mean"], f"AdamW's mean final loss ({adam['source']})"))
    at = [x for x in (loss_at(r.val_curve, STEP_TARGET) for r in adam["runs"]) if x is not None]
    if at:
        out.append((sum(at) / len(at), f"AdamW's mean loss at step {STEP_TARGET} ({adam['source']})"))
    return out


def read_rel_norms(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """parameter -> [(step, ||delta theta|| / ||theta||)] from the run's event files (UpdateSizeQuantiles)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if match := re.fullmatch(r"update/(.+)/rel_norm", tag):
                series.setdefault(match[1], {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {p: sorted(v.items()) for p, v in series.items()}


def plot_update_size(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """||delta theta|| / ||theta|| of each tensor over training, one panel per kind (plot_eff_lr's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lm_opt.study.plot_eff_lr import panels

    groups = panels(list(series))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3), squeeze=False, sharey=True)
    for ax, (kind, names) in zip(axes.flat, groups.items()):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{kind} ({len(names)})", fontsize=9)
    fig.suptitle(f"{title}: update size ||delta theta|| / ||theta|| per tensor")
    fig.supxlabel("step")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def diagnostics(run_dir: Path, out: Path) -> list[str]:
    """The best run's effective-lr figure (where its optimizer exposes one) and update-size figure."""
    from lm_opt.study.plot_eff_lr import numbers, plot as plot_eff_lr, read_quantiles

    lines = []
    eff = {p: q for p, q in read_quantiles(run_dir).items() if {5, 25, 50, 75, 95} <= set(q)}
    if eff:
        plot_eff_lr(eff, out / "eff_lr.png", run_dir.name)
        lines += [f"Effective lr of `{run_dir.name}` (lm_opt.study.plot_eff_lr):", "", *numbers(eff), "",
                  "![effective lr](eff_lr.png)", ""]
    sizes = read_rel_norms(run_dir)
    if sizes:
        plot_update_size(sizes, out / "update_size.png", run_dir.name)
        last = sorted(v[-1][1] for v in sizes.values())
        lines += [f"Update size of `{run_dir.name}` (`update/<parameter>/rel_norm`): at the last logged step the "
                  f"median tensor moved by {last[len(last) // 2]:.2e} of its norm (range {last[0]:.2e} .. "
                  f"{last[-1]:.2e}).", "", "![update size](update_size.png)", ""]
    if not lines:
        lines = [f"`{run_dir.name}` has no event files with eff_lr or update-size tags (a record copied from "
                 "a committed sweep, which keeps no event files); rerun that point to draw them.", ""]
    return lines


def figures(card, mine: list[dict], theirs: dict, goals: list[float], unigram: float | None) -> list[str]:
    """plot_lr.png, plot_beta1.png and plot_curves.png: the card's lines over the baselines' lines."""
    out, drawn = card.dir, []
    for axis, own, base in (("lr", mine[0], theirs.get("lr_rows")), ("beta1", mine[1], theirs.get("beta1_rows"))):
        rows = labelled((own.get("rows") or []) + (base or []))
        if own and plot(rows, axis, out / f"plot_{axis}.png", seed_noise(rows), unigram):
            drawn.append(f"plot_{axis}.png")
    lines = [dict(l["stable"], optimizer=l["label"], condition=l["source"]) for l in theirs["curves"] + mine[:1]
             if l and l["runs"]]
    runs = [l["runs"] for l in theirs["curves"] + mine[:1] if l and l["runs"]]
    if plot_curves(list(zip(lines, runs)), out / "plot_curves.png", goals, unigram, f"card {card.name}"):
        drawn.append("plot_curves.png")
    return [f"![{Path(p).stem}]({p})" for p in drawn]


def baseline_lines(card, ran: dict) -> dict:
    """The baselines' lines that may be compared here: the committed sweeps' where they are of this
    CPU kind and precision, else the card's rerun of AdamW."""
    margin, usable, out = card.protocol.margin, ran["usable"], {"curves": []}
    if usable["cpu_lr"][0]:
        rows = load_rows(card.committed / "cpu_lr")
        out.update(lr=line_stats(rows, REFERENCE, margin, "cpu_lr"), lr_rows=rows)
    else:
        rows = load_rows(card.dir / "baselines")
        out.update(lr=line_stats(rows, REFERENCE, margin, "rerun here"), lr_rows=rows)
    if usable["cpu_beta1"][0]:
        rows = load_rows(card.committed / "cpu_beta1")
        out.update(beta1=line_stats(rows, REFERENCE, margin, "cpu_beta1"), beta1_rows=rows)
    if usable["soap_cpu"][0]:
        rows = load_rows(card.committed / "soap_cpu")
        out["steps"] = line_stats(rows, REFERENCE, margin, "soap_cpu")
        out["curves"] = [line_stats(rows, label, margin, "soap_cpu") for label in (REFERENCE, "soap", "muon")]
    else:
        out["steps"] = out["lr"]
        out["curves"] = [out["lr"]]
    return out


def verdict_rows(name: str, mine: list[dict], theirs: dict, usable: dict, grid_step: float) -> list[str]:
    """The card's table of measures: the card's value, AdamW's, whose records, the verdict."""
    lr, beta, adam = mine[0], mine[1], theirs["lr"]
    rows = [f"| measure | {name} | AdamW | AdamW's records | verdict |", "|" + " --- |" * 5]
    verdict = ""
    if "mean" in lr["stats"] and adam and "mean" in adam["stats"]:
        delta = lr["stats"]["mean"] - adam["stats"]["mean"]
        verdict = f"**{loss_verdict(lr['stats'], adam['stats'])}** ({delta:+.4f} nats against AdamW's mean)"
    rows.append(f"| best lr: final val loss, mean (range) over seeds | {cell(lr)} | {cell(adam) if adam else ''} "
                f"| {adam.get('source', '')} | {verdict} |")
    if adam and adam["stable"]["points"] < 2:
        rows.append(f"| lr range within 0.1 nats of the best (F2) | {span(lr)} | not measured: only AdamW's best lr "
                    f"was rerun here (`--baseline-grid` reruns its grid) | {adam['source']} | no verdict |")
    else:
        stable, detail = stability_verdict(lr["widths"], adam.get("widths") or [], grid_step)
        rows.append(f"| lr range within 0.1 nats of the best (F2) | {span(lr)} | {span(adam) if adam else ''} "
                    f"| {adam.get('source', '')} | **{stable}**: {detail} |")
    if beta:
        other = theirs.get("beta1")
        note = span(other) if other else f"not compared: cpu_beta1 {usable['cpu_beta1'][1]}"
        rows.append(f"| beta1 range within 0.1 nats of the best (F3), best beta1 | {span(beta)}; best {cell(beta)} "
                    f"| {note} | {other['source'] if other else ''} | F3's measure: a description, no verdict |")
    return rows


def steps_section(mine: dict, theirs: dict, interval: str) -> tuple[list[str], list[float]]:
    """Steps to AdamW's mean final loss and to its mean loss at STEP_TARGET, of the card's best point
    and the steps baseline's lines (AdamW; SOAP and Muon where soap_cpu is comparable here)."""
    goals = targets(theirs["steps"]) if theirs.get("steps") else []
    lines = [f"## Steps to target ({interval})", "",
             "Per run of each line's best point, the step at which its validation curve first reaches the target, "
             "linear between validations (lm_opt.study.target): no finer than their spacing.", ""]
    if not goals:
        return lines + ["No AdamW baseline with seed statistics: no targets.", ""], []
    lines += ["| line | records | " + " | ".join(f"to {text}: {goal:.4f}" for goal, text in goals) + " |",
              "|" + " --- |" * (2 + len(goals))]
    curves = [l for l in [mine, *theirs["curves"]] if l and l["runs"]]
    timed = [steps_rows(curves, goal) for goal, _ in goals]
    for i, line in enumerate(curves):
        lines.append(f"| {line['label']} {show(line['stable']['best_x'])} | {line['source']} | "
                     + " | ".join(step_cell(t[i]) for t in timed) + " |")
    return lines + [""], [g for g, _ in goals]


def cost_rows(mine: dict, theirs: dict, timing: dict | None) -> list[str]:
    """Step time against AdamW's, measured side by side here, and optimizer state per parameter."""
    rows = []
    if timing:
        step, rounds = timing["step_s"], timing["rounds_s"]
        ratios = [card / adamw for card, adamw in zip(rounds["card"], rounds[REFERENCE])]
        rows.append(f"| step time, side by side here ({timing['preset']} preset, {timing['batch_size']} x "
                    f"{timing['seq_len']}, {timing['threads']} thread(s), median of {len(ratios)} alternating rounds; "
                    f"the ratio is the median of the rounds' ratios) | {1e3 * step['card']:.0f} ms | "
                    f"{1e3 * step[REFERENCE]:.0f} ms | measured here | {timing['ratio']:.2f} x AdamW's (rounds "
                    f"{min(ratios):.2f} .. {max(ratios):.2f}) |")
    state = [r.optimizer_state_bytes / r.parameters for line in (mine, theirs.get("lr") or {})
             for r in line.get("runs", [])[:1] if r.optimizer_state_bytes is not None and r.parameters]
    if len(state) == 2:
        rows.append(f"| optimizer state (bytes per parameter, {SUMMARY_FILE}) | {state[0]:.2f} | {state[1]:.2f} "
                    f"| {theirs['lr']['source']} | {state[0] / state[1]:.2f} x AdamW's |")
    return rows


def runs_table(rows: list[dict]) -> list[str]:
    lines = ["| point | lr or beta1 | seed | final val loss | status | wall time (s) | record |", "|" + " --- |" * 7]
    for r in rows:
        value = ", ".join(f"{k} {show(v)}" for k, v in r.values.items())
        record = "copied" if r.copied else "ran here"
        loss = "" if r.final_val_loss is None else f"{r.final_val_loss:.4f}"
        wall = "" if r.wall_time_s is None else f"{r.wall_time_s:.0f}"
        lines.append(f"| {r.point} | {value} | {'' if r.seed is None else r.seed} | {loss} | {r.status} "
                     f"| {wall} | {record} |")
    return lines


def class_paths_line(config: str) -> str:
    """The optimizer classes the YAML names (nested objects too), with their third-party packages'
    versions (lm_opt.provenance.optimizer_packages)."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("class_path"), str):
                found.append(node["class_path"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(callback_init_args(read_yaml(config), config))
    packages = optimizer_packages([path.rpartition(".")[0] for path in found])
    versions = ", ".join(f"{name} {version}" for name, version in packages.items())
    return ", ".join(f"`{path}`" for path in dict.fromkeys(found)) + (f" ({versions})" if versions else "")


def protocol_lines(card, rows: list[dict], usable: dict, elapsed: float) -> list[str]:
    p = card.protocol
    overrides = ", ".join(f"{k} {v}" for k, v in p.overrides.items())
    lrs = sorted({r.values["lr"] for r in rows if r.optimizer == card.name})
    lines = [f"`python -m lm_opt card {card.config}`: the CPU study's protocol (`cpu_lr`, `cpu_beta1`) on "
             f"{', '.join(p.base)} with {overrides}; precision {card.precision} on this CPU "
             f"({describe(cpu_arithmetic())}).", "",
             f"- optimizer: {class_paths_line(card.config)}.",
             f"- lr grid in quarter decades around the YAML's lr {card.center:g}: {', '.join(show(x) for x in lrs)}; "
             + "; ".join(card.log) + ".",
             f"- the grid again under seeds {p.grid_seeds} (the stable width's noise); seeds {p.best_seeds} more at "
             f"the best lr (seed 0 first).",
             (f"- beta1 over {list(p.beta1)} at the best lr, seeds {p.beta1_seeds} more at the best beta1."
              if card.has_beta1 else "- no beta1 line: the optimizer has no `betas` or `momentum`."), "",
             "Baselines (AdamW and the study's optimizers), used only where made on this CPU kind and precision:", ""]
    for sweep, (ok, why) in usable.items():
        lines.append(f"- `logs/sweeps/{sweep}`: {'used' if ok else 'not used'}, {why}.")
    if not usable["cpu_lr"][0]:
        lines += ["", f"So the card reran AdamW (`{ADAMW_YAML}`) at `cpu_lr`'s best lr {p.baseline_lr:g} with seeds "
                      f"0, {', '.join(map(str, p.grid_seeds + p.best_seeds))}"
                  + (" and its whole `cpu_lr` grid under the grid seeds" if card.baseline_grid else "")
                  + f" into `{card.dir / 'baselines'}`, and compares the card's numbers with that rerun only."]
    ran = [r for r in rows if not r.copied and r.wall_time_s is not None]
    lines += ["", f"Compute: {len(ran)} runs ran here ({sum(r.wall_time_s for r in ran) / 3600:.2f} h summed), "
                  f"{sum(r.copied for r in rows)} copied from records of this machine; this invocation took "
                  f"{elapsed / 60:.1f} min of wall clock.", ""]
    return lines


def write_card(card, ran: dict, elapsed: float) -> Path:
    """card.md, results.csv and the figures of a card whose runs are done (or as far as they got)."""
    from lm_opt.study.target import validation_interval

    rows = load_rows(card.dir)
    base_rows = load_rows(card.dir / "baselines") if (card.dir / "baselines").is_dir() else []
    write_csv(rows, card.dir / "results.csv")
    margin = card.protocol.margin
    mine = [line_stats(rows, card.name, margin, card.name), line_stats(rows, f"{card.name}_beta1", margin, card.name)]
    theirs = baseline_lines(card, ran)
    unigram = (baseline(card.dir, rows) or {}).get("unigram_val_loss")
    steps, goals = steps_section(mine[0], theirs, validation_interval(rows))
    lines = [f"# Card: {card.name}", "", *protocol_lines(card, rows + base_rows, ran["usable"], elapsed), "## Verdicts",
             "", "In the study's words: a difference counts only where the seed ranges do not overlap; \"less "
             "stable\" is F2's rule (a width difference beyond the widths' seed spread plus one grid step).", "",
             *verdict_rows(card.name, mine, theirs, ran["usable"], card.protocol.grid_step),
             *cost_rows(mine[0], theirs, ran.get("timing")), ""]
    if unigram is not None:
        lines += [f"Unigram baseline of the validation set: {unigram:.4f} nats.", ""]
    lines += card_speedup_lines(mine[0], card.dir.parent.parent / "sweeps" / LADDER, margin)
    lines += horizon_section(card, margin)
    lines += steps + ["## Figures", "", *figures(card, mine, theirs, goals, unigram), ""]
    best = ran.get("best")
    if best is not None:
        lines += ["## Diagnostics of the best run", "", *diagnostics(best.run_dir, card.dir)]
    if card.problems:
        lines += ["## Not finished", ""] + [f"- CRASHED {n}: {p}" for n, p in card.problems.items()] + [""]
    lines += ["## Every run", "", *runs_table(rows + base_rows), ""]
    (card.dir / "card.md").write_text("\n".join(lines))
    print(f"card: {card.dir / 'card.md'}, results.csv", flush=True)
    return card.dir / "card.md"
