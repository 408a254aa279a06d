"""`python -m lm_opt report SWEEP_DIR [--margin 0.05] [--target adamw ...] [--compare SWEEP_DIR ...] [--panel AXIS=REGEX]`: a
sweep's table, plots, stability and steps to target losses.

Reads the point folders alone (lm_opt.study.rows: each one's point record and its run's
summary). Writes `results.csv` and `results.md` (lm_opt.study.tables) and one `plot_<axis>.png`
per swept axis (lm_opt.study.plots): final validation loss against the swept value, one line per
optimizer and per value of the other axes (e.g. qk_norm), the best point of each line a star,
diverged points an x at the top of the axes.

Stability (lm_opt.study.stats, after the study's Fig. 1): the range of the swept value whose
final loss lies within `margin` nats of the line's best, and its width in decades where the
line's grid is logarithmic (an lr, eps; not beta1 from 0 to 0.99, whose range is the measure).

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
from pathlib import Path

from lm_opt.record import (POINT_FILE, RESULTS_CSV, RESULTS_MD, SPEC_FILE, SUMMARY_FILE, read_baseline, read_config,
                           write_baseline)
from lm_opt.study.plots import plot
from lm_opt.study.rows import Row, labelled, load_rows, panelled, series_key, x_axis
from lm_opt.study.speedup_report import speedup_section
from lm_opt.study.stats import REFERENCE, best_runs, findings, seed_noise, stability, stability_per_seed
from lm_opt.study.sweep_plan import format_value
from lm_opt.study.tables import comparison, markdown, write_csv
from lm_opt.study.target import plot_curves, target_loss, time_to_target, validation_interval


def baseline(sweep_dir: Path, rows: list[Row]) -> dict | None:
    """The unigram baseline of the runs' data (cached in the sweep's folder); None without a run config."""
    cached = read_baseline(sweep_dir)
    if cached is not None:
        return cached
    config = next((c for c in map(read_config, (r.run_dir for r in rows)) if c is not None), None)
    if config is None:
        return None
    from lm_opt.study.baseline import data_baseline

    result = {**data_baseline(config["data"]), "data": config["data"]}
    write_baseline(sweep_dir, result)
    return result


def swept_plots(sweep_dir: Path, rows: list[Row], others: list[list[Row]], unigram: float | None,
                panel: str | None = None) -> list[Path]:
    """One plot per axis the rows are plotted against, with the lines of the sweeps in `others`
    (and a panel per value of `panel`)."""
    drawn = labelled(rows + [r for other in others for r in other]) if others else rows
    plots = []
    for axis in dict.fromkeys(x_axis(r) for r in rows if x_axis(r)):
        path = sweep_dir / f"plot_{format_value(axis)}.png"
        if plot(drawn, axis, path, seed_noise(drawn), unigram, panel):
            plots.append(path)
    return plots


def steps_to_targets(rows: list[Row], stable: list[dict], noise: dict[tuple, dict], targets: list[str] | None,
                     panels: bool = False, condition: str = "") -> tuple[list[tuple[str, str, list[dict]]], list[float]]:
    """Per target, how it was set, the validation interval and each line's steps to it (targets
    default to the reference optimizer where the runs have validation curves); and the losses.
    With `panels`, each condition (a panel) is timed against its reference line under it."""
    if panels:
        timed, goals = [], []
        for condition in dict.fromkeys(s["condition"] for s in stable):
            part, its_goals = steps_to_targets([r for r in rows if series_key(r)[1] == condition],
                                               [s for s in stable if s["condition"] == condition], noise, targets,
                                               condition=condition)
            timed += [(f"{condition}: {described}", every, lines) for described, every, lines in part]
            goals += its_goals
        return timed, goals
    lines, timed, goals = best_runs(rows, stable), [], []
    curves = any(len(r.val_curve or []) > 1 for _, runs in lines for r in runs)
    if not targets and curves and any(s["optimizer"] == REFERENCE for s, _ in lines):
        targets = [REFERENCE]
    for target in targets or []:
        goal, described = target_loss(target, stable, noise)
        goals.append(goal)
        timed.append((described, validation_interval(rows), time_to_target(lines, goal, REFERENCE, condition)))
    return timed, goals


def write_report(sweep_dir: str | Path, margin: float = 0.05, targets: list[str] | None = None,
                 compare: list[str | Path] = (), panel: str | None = None) -> Path:
    """Write results.csv, results.md and the plots into `sweep_dir`; returns results.md. Each of
    `targets` (a setup's label or a loss) adds steps to that target; they default to the reference
    optimizer where the runs have validation curves. Each sweep in `compare` (the same grid under
    another setup) adds its lines to the plots, dashed, and a table of best points against it.
    `panel` (`AXIS=REGEX`, e.g. `width=_w(\\d+)$`) reads the regex's group in each label as that
    axis' value (lm_opt.study.rows.panelled): each value is compared within itself and drawn as a
    panel of its own."""
    sweep_dir = Path(sweep_dir)
    rows = load_rows(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no point folders ({POINT_FILE} or {SUMMARY_FILE})")
    axis = None
    if panel:
        axis, _, pattern = panel.partition("=")
        if not axis or not pattern:
            raise ValueError(f"--panel must be AXIS=REGEX with one group, e.g. 'width=_w(\\d+)$', got {panel!r}")
        rows = panelled(rows, axis, pattern)
    write_csv(rows, sweep_dir / RESULTS_CSV)
    base, noise = baseline(sweep_dir, rows), seed_noise(rows)
    unigram = base and base["unigram_val_loss"]
    others = [load_rows(Path(d)) for d in compare]
    if not all(others):
        raise FileNotFoundError(f"a sweep to compare with holds no point folders: {[str(d) for d in compare]}")
    plots = swept_plots(sweep_dir, rows, others, unigram, axis)
    stable = stability(rows, margin)
    timed, goals = steps_to_targets(rows, stable, noise, targets, panels=axis is not None)
    if plot_curves(best_runs(rows, stable), sweep_dir / "plot_curves.png", goals, unigram):
        plots.append(sweep_dir / "plot_curves.png")
    compared = [line for other in others for line in comparison(stable, noise, other, margin)]
    compared += speedup_section(rows, sweep_dir, margin)
    (sweep_dir / RESULTS_MD).write_text(markdown(rows, stable, findings(stable, noise), base, plots, margin, timed,
                                                 stability_per_seed(rows, margin), compared, axis))
    print(f"report: {sweep_dir / RESULTS_MD}, {RESULTS_CSV}, " + ", ".join(p.name for p in plots))
    return sweep_dir / RESULTS_MD


def spec_report_options(sweep_dir: Path) -> dict:
    """The `report:` options of the spec the sweep in `sweep_dir` ran (its copy there), if any."""
    import yaml

    from lm_opt.study.sweep_plan import SpecError, report_options
    from lm_opt.user_yaml import read_yaml

    path = sweep_dir / SPEC_FILE
    if not path.is_file():
        return {}
    try:
        return report_options((read_yaml(path) or {}).get("report"))
    except (yaml.YAMLError, SpecError, AttributeError) as err:
        raise ValueError(f"{path}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_opt report", description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", help="a sweep's out_dir, e.g. logs/sweeps/tiny_cpu")
    parser.add_argument("--margin", type=float, help="nats above the best loss that count as stable (default: the "
                                                      "sweep spec's report.margin, else 0.05)")
    parser.add_argument("--target", nargs="+", help=f"steps to these losses: a setup's label (its mean final loss "
                                                    f"over seeds) or a number; default {REFERENCE} where the runs "
                                                    "have validation curves")
    parser.add_argument("--compare", nargs="+", default=[], metavar="SWEEP_DIR",
                        help="sweeps of the same grid under another setup (e.g. the base of an ablation): their "
                             "lines join the plots, dashed, and a table compares each line's best")
    parser.add_argument("--panel", metavar="AXIS=REGEX",
                        help="lines whose labels carry a tag, e.g. 'width=_w(\\d+)$' for adamw_w128: each tag's "
                             "lines compared among themselves and drawn in a panel of their own (default: the "
                             "sweep spec's report.panel)")
    args = parser.parse_args(argv)
    try:
        options = spec_report_options(Path(args.sweep_dir))
        margin = args.margin if args.margin is not None else options.get("margin", 0.05)
        write_report(args.sweep_dir, margin, args.target, args.compare, args.panel or options.get("panel"))
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
