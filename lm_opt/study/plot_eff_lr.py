"""`python -m lm_opt plot-eff-lr RUN_DIR`: the study's figure of effective-lr quantiles per layer
over training, from a run's TensorBoard logs (written by EffectiveLRQuantiles), and the numbers
read off it (`eff_lr.md`): per panel, how far each tensor's effective lr spreads within the
tensor (decades from its 5th to its 95th percentile) and how far its median moves over training."""

import argparse
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lm_opt.model import Kind, kind_of  # noqa: E402

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


SPREAD = "last layer: spread across logits"
# The figure's panel for each kind of parameter (lm_opt.model.kind_of), in order. The last layer's
# per-logit medians (`lm_head.weight/rows`) get a panel of their own, SPREAD, before its own.
PANELS: dict[Kind, str] = {"qkv": "QKV", "attn_out": "attention out", "mlp_in": "MLP in", "mlp_out": "MLP out",
                           "norm": "norms", "embedding": "embedding", "last_layer": "last layer"}
TITLES = (*list(PANELS.values())[:-1], SPREAD, PANELS["last_layer"], "other")
BLOCK = re.compile(r"blocks\.(\d+)\.")


def depth(name: str) -> int | None:
    """The block index of a parameter; None outside the blocks (embedding, final norm, last layer)."""
    match = BLOCK.search(name)
    return int(match[1]) if match else None


def panel_of(name: str) -> str:
    """The title of the panel that draws the tensor `name` (a parameter, or `<parameter>/rows`)."""
    param, _, view = name.partition("/")
    kind = kind_of(param)
    return SPREAD if kind == "last_layer" and view == "rows" else PANELS.get(kind, "other")


def panels(names: list[str]) -> dict[str, list[str]]:
    """Parameter names grouped by kind, in TITLES order; names of no kind go to `other`."""
    groups: dict[str, list[str]] = {title: [] for title in TITLES}
    for name in sorted(names, key=lambda n: (depth(n) is None, depth(n) or 0, n)):
        groups[panel_of(name)].append(name)
    return {title: members for title, members in groups.items() if members}


def plot(series: dict[str, dict[int, list[tuple[int, float]]]], out: Path, title: str) -> None:
    """One panel per kind of tensor, log scale. Each tensor's median is a line coloured by its
    depth (black outside the blocks) over its shaded 25-75% band; the panel of the last
    layer's spread across logits shows the quantiles of the per-logit medians instead."""
    groups = panels(list(series))
    depths = [d for name in series if (d := depth(name)) is not None]
    colors = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(0, max(depths, default=0) or 1)
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharex=True)
    for ax, (kind, names) in zip(axes.flat, groups.items()):
        for name in names:
            qs = series[name]
            steps = [s for s, _ in qs[50]]
            value = {q: [v for _, v in qs[q]] for q in qs}
            if kind == SPREAD:
                ax.fill_between(steps, value[5], value[95], alpha=0.2, color="k", label="5-95% of logits")
                ax.fill_between(steps, value[25], value[75], alpha=0.4, color="k", label="25-75%")
                ax.plot(steps, value[50], color="k", label="median")
                ax.legend(fontsize=7)
                continue
            d = depth(name)
            color = "k" if d is None else colors(norm(d))
            ax.fill_between(steps, value[25], value[75], alpha=0.12, color=color, linewidth=0)
            ax.plot(steps, value[50], color=color, linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{kind} ({len(names)} tensors)" if len(names) > 1 else kind, fontsize=9)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if depths:
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colors), ax=axes, label="block (depth)",
                     shrink=0.8, pad=0.02)
    fig.suptitle(f"{title}: median and 25-75% of each tensor's effective lr")
    fig.supxlabel("step")
    fig.supylabel("effective lr  lr / (sqrt(v_hat) + eps)")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def decades(high: float, low: float) -> float:
    return math.log10(high / low) if high > 0 and low > 0 else math.nan


def numbers(series: dict[str, dict[int, list[tuple[int, float]]]]) -> list[str]:
    """A markdown table per panel: the median over its tensors of (a) the spread within a tensor at
    the last logged step, log10(q95 / q5), and (b) the change of a tensor's median over training,
    log10(max / min) of it across the logged steps; with the median effective lr at the first and
    last logged steps."""
    lines = ["| panel | tensors | median eff. lr, first log | last log | spread within a tensor, last log "
             "(decades q5..q95) | change of a tensor's median over training (decades) |", "|" + " --- |" * 6]
    for kind, names in panels(list(series)).items():
        first = statistics.median(series[n][50][0][1] for n in names)
        last = statistics.median(series[n][50][-1][1] for n in names)
        spread = statistics.median(decades(series[n][95][-1][1], series[n][5][-1][1]) for n in names)
        moved = statistics.median(decades(max(v for _, v in series[n][50]), min(v for _, v in series[n][50]))
                                  for n in names)
        lines.append(f"| {kind} | {len(names)} | {first:.3g} | {last:.3g} | {spread:.2f} | {moved:.2f} |")
    steps = [s for s, _ in next(iter(series.values()))[50]]
    return [f"Logged at steps {steps[0]} .. {steps[-1]} ({len(steps)} times).", ""] + lines


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
    table = out.with_suffix(".md")
    table.write_text("\n".join([f"# Effective learning rates of {args.run_dir.name}", "", *numbers(series)]) + "\n")
    print(f"wrote {out} ({len(series)} tensors in {len(panels(list(series)))} panels) and {table}")
