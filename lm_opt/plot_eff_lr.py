"""`python -m lm_opt plot-eff-lr RUN_DIR`: the study's figure of effective-lr quantiles per layer
over training, from a run's TensorBoard logs (written by EffectiveLRQuantiles)."""

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TAG = re.compile(r"^eff_lr/(?P<param>.+)/q(?P<q>\d+)$")


def read_quantiles(run_dir: Path) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """parameter -> quantile (percent) -> [(step, value)] over all event files of the run."""
    series: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for events in sorted(run_dir.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if match := TAG.match(tag):
                for event in acc.Scalars(tag):
                    series[match["param"]][int(match["q"])][event.step] = event.value
    return {p: {q: sorted(v.items()) for q, v in qs.items()} for p, qs in series.items()}


def plot(series: dict[str, dict[int, list[tuple[int, float]]]], out: Path, title: str) -> None:
    """One panel per parameter: the median line and shaded 5-95% and 25-75% bands, log scale."""
    names = sorted(series)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        qs = series[name]
        steps = [s for s, _ in qs[50]]
        value = {q: [v for _, v in qs[q]] for q in qs}
        ax.fill_between(steps, value[5], value[95], alpha=0.2, label="5-95%")
        ax.fill_between(steps, value[25], value[75], alpha=0.4, label="25-75%")
        ax.plot(steps, value[50], label="median")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.supxlabel("step")
    fig.supylabel("effective lr  lr / (sqrt(v_hat) + eps)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_opt plot-eff-lr", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. logs/quickstart")
    parser.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/eff_lr.png)")
    parser.add_argument("--match", default="", help="only parameters whose name contains this regex")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"run_dir {args.run_dir} is not a directory")
    series = {p: qs for p, qs in read_quantiles(args.run_dir).items() if re.search(args.match, p)}
    series = {p: qs for p, qs in series.items() if {5, 25, 50, 75, 95} <= set(qs)}
    if not series:
        parser.error(f"no eff_lr/<param>/q<percent> scalars in {args.run_dir}: run with eff_lr.every_n_steps > 0 "
                     "and an adaptive optimizer")
    out = args.out or args.run_dir / "eff_lr.png"
    plot(series, out, title=args.run_dir.name)
    print(f"wrote {out} ({len(series)} parameters)")
