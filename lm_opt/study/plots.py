"""The report's plot per swept axis: final validation loss against the swept value, one line per
optimizer and per value of the other axes (e.g. qk_norm), the best point of each line a star, its
seed range an error bar, diverged points an x at the top of the axes, and the data's unigram
baseline a horizontal line."""

from pathlib import Path

import numpy as np

from lm_opt.study.rows import Row, numeric, series_key, show, x_axis
from lm_opt.study.stats import logarithmic


def draw_line(ax, line: list[Row], axis: str, style: str, color: str, label: str, noise: list[dict], top) -> None:
    """One line's finished points, its best a star, the seed ranges at its points, and its diverged
    points as an x at the top of the axes (`top`: data x, axes y)."""
    ok = [r for r in line if r.status == "finished" and r.final_val_loss is not None]
    diverged = [r.values[axis] for r in line if r.status == "diverged"]
    ax.plot([r.values[axis] for r in ok], [r.final_val_loss for r in ok], style, color=color, marker="o", ms=4,
            label=label)
    if ok:
        best = min(ok, key=lambda r: r.final_val_loss)
        ax.plot(best.values[axis], best.final_val_loss, "*", color=color, ms=15, mec="black", zorder=3)
    for stats in noise:
        ax.errorbar(stats["x"], stats["mean"], yerr=[[stats["mean"] - stats["min"]], [stats["max"] - stats["mean"]]],
                    color=color, capsize=5, elinewidth=2, zorder=4)
    ax.plot(diverged, [0.97] * len(diverged), "x", color=color, ms=9, mew=2, transform=top, clip_on=False)


def momentum_scale(ax, xs: list[float], axis: str) -> str:
    """Momentum on the scale of its averaging horizon 1 / (1 - beta): 0, 0.9, 0.99 equally spaced;
    returns the axis label that says so."""
    def horizon(b):
        return -np.log10(np.maximum(1 - np.asarray(b), 1e-12))  # matplotlib probes beta = 1

    def beta(h):
        return 1 - 10.0 ** -np.asarray(h)

    pad = 0.05 * (horizon(xs[-1]) - horizon(xs[0]))
    ax.set_xscale("function", functions=(horizon, beta))
    ax.set_xlim(beta(horizon(xs[0]) - pad), beta(horizon(xs[-1]) + pad))
    ax.set_xticks(xs, [show(x) for x in xs])
    return f"{axis} (spaced by log 1 / (1 - {axis}))"


def in_order(tag) -> tuple:
    """Panels by number where their tags are numbers (steps 50 before 400), else by name."""
    number = isinstance(tag, (int, float)) and not isinstance(tag, bool)
    return (not number, tag if number else 0, str(tag))


def plot(rows: list[Row], axis: str, path: Path, noise: dict[tuple, dict] | None = None,
         unigram: float | None = None, panel: str | None = None) -> bool:
    """Final val loss against `axis` (log scale over more than a decade; a beta on the log scale of
    1 - beta), with the seed range as error bars and the unigram baseline as a line; with `panel`
    (a shared axis, e.g. the model's width), one panel per value of it, on one loss scale. False if
    nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if x_axis(r) == axis and numeric(r.values.get(axis))
            and r.status in ("finished", "diverged") and r.seed is None]
    if not rows:
        return False
    tags = sorted({r.values.get(panel) for r in rows}, key=in_order) if panel else [None]
    fig, axes = plt.subplots(1, len(tags), figsize=(7 if not panel else 4.2 * len(tags), 4.5), sharey=True,
                             squeeze=False)
    colors = {o: f"C{i % 10}" for i, o in enumerate(dict.fromkeys(r.optimizer for r in rows))}
    for ax, tag in zip(axes[0], tags):
        draw_axes(ax, [r for r in rows if not panel or r.values.get(panel) == tag], axis, noise, unigram, colors,
                  panel)
        ax.set_title(f"{panel} {show(tag)}" if panel else
                     f"{rows[0].sweep}\nstar = best per line, bars = seed range, x at top = diverged")
    low, high = axes[0][0].get_ylim()  # one scale for every panel
    axes[0][0].set_ylim(low, high + 0.08 * (high - low))  # room for the diverged marks
    if panel:
        fig.suptitle(f"{rows[0].sweep}: star = best per line, bars = seed range, x at top = diverged")
    axes[0][0].set_ylabel("final validation loss")
    legend = {}  # every panel's lines, once each, beside the last axes: over them it hides the curves
    for ax in axes[0]:
        legend |= {label: handle for handle, label in zip(*ax.get_legend_handles_labels()) if label not in legend}
    if legend:
        axes[0][-1].legend(legend.values(), legend.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def draw_axes(ax, rows: list[Row], axis: str, noise: dict[tuple, dict] | None, unigram: float | None,
              colors: dict[str, str], panel: str | None) -> None:
    """Every line of `rows` on `ax`, the baseline, the scales and the labels."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)

    def condition(row: Row) -> str:  # the panel's own value goes without saying
        return "; ".join(c for c in series_key(row)[1].split("; ") if not panel or not c.startswith(f"{panel}="))

    styles = {c: ("-", "--", ":", "-.")[i % 4] for i, c in enumerate(dict.fromkeys(condition(r) for r in rows))}
    for optimizer, shown in dict.fromkeys((r.optimizer, condition(r)) for r in rows):
        line = sorted((r for r in rows if (r.optimizer, condition(r)) == (optimizer, shown)),
                      key=lambda r: r.values[axis])
        if not any(r.status == "diverged" or (r.status == "finished" and r.final_val_loss is not None) for r in line):
            continue
        stats = [v for k, v in (noise or {}).items() if k[:2] == series_key(line[0]) and "mean" in v]
        draw_line(ax, line, axis, styles[shown], colors[optimizer], optimizer + (f" ({shown})" if shown else ""),
                  stats, top)
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", lw=1.5, label=f"unigram baseline ({unigram:.3f})")
    xs, label = sorted({r.values[axis] for r in rows}), axis
    if logarithmic(xs):
        ax.set_xscale("log")
    elif "beta" in axis and all(0 <= x < 1 for x in xs):
        label = momentum_scale(ax, xs, axis)
    ax.set(xlabel=label)
    ax.grid(True, which="both", alpha=0.3)
