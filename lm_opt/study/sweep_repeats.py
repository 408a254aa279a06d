"""Which grid points a spec's `grid_seeds` run again when it repeats only each line's stable range
(`grid_seeds_cover: stable`), not the whole grid.

F2's width under another seed needs the lrs within `margin` of that seed's best and one point beyond
each end, where the loss is worse by more than `margin` (or the grid's end); points further out
measure nothing. So a line's repeat starts on the grid's own stable range and its neighbours, and
grows one point outward wherever the seed's own range reaches an end of what it ran, until both
ends are bracketed. A line whose points differ in more than one value is repeated whole.
"""

import math

from lm_opt.record import read_summary
from lm_opt.study.sweep_plan import DONE, Point, line_of, with_seed


def final_loss(point: Point) -> float | None:
    """A done point's final loss (inf where it diverged); None while it is not done."""
    summary = read_summary(point.run_dir)
    if summary.status not in DONE:
        return None
    return summary.final_val_loss if summary.status == "finished" and summary.final_val_loss is not None else math.inf


def bracket(losses: dict[int, float], margin: float, last: int) -> tuple[int, int] | None:
    """The indices from one below to one above those within `margin` of the best finite loss
    (clipped to 0..last); None where nothing finished."""
    finite = {i: loss for i, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        return None
    best = min(finite.values())
    near = [i for i, loss in finite.items() if loss <= best + margin]
    return max(min(near) - 1, 0), min(max(near) + 1, last)


def ordered_lines(grid: list[Point]) -> list[list[Point]]:
    """The grid's lines (lm_opt.study.sweep_plan.line_of), each sorted along its one own axis; a line
    whose points differ in more than one value comes as it is, flagged by `one_axis`."""
    lines: dict[tuple, list[Point]] = {}
    for p in grid:
        lines.setdefault(line_of(p), []).append(p)
    return [sorted(line, key=lambda p: p.values[axis]) if (axis := one_axis(line)) else line
            for line in lines.values()]


def one_axis(line: list[Point]) -> str | None:
    """The one value the line's points differ in, where it is a single numeric axis."""
    varying = [k for k in line[0].values if len({repr(p.values[k]) for p in line}) > 1]
    if len(varying) == 1 and all(isinstance(p.values[varying[0]], (int, float)) for p in line):
        return varying[0]
    return None


def stable_repeats(grid: list[Point], seed: int, margin: float) -> list[Point]:
    """The points to run (or already run) under `seed` as far as the done runs tell; call again once
    they are done, until it returns no new point. A line waits until its own grid is done. Every
    line's best lr comes first, then the points one step from it, and so on: a sweep stopped early
    has the best points' seeds (F1's noise) before the ranges' far ends."""
    out = []
    for number, line in enumerate(ordered_lines(grid)):
        repeats = [with_seed(p, seed) for p in line]
        if one_axis(line) is None:
            out += [(0, number, i, p) for i, p in enumerate(repeats)]
            continue
        own = [final_loss(p) for p in line]
        if any(loss is None for loss in own):
            continue
        span = bracket(dict(enumerate(own)), margin, len(line) - 1)
        if span is None:
            continue
        wanted = set(range(span[0], span[1] + 1))
        while True:
            losses = {i: final_loss(repeats[i]) for i in wanted}
            if any(loss is None for loss in losses.values()):
                break
            grown = bracket(losses, margin, len(line) - 1)
            if grown is None or wanted >= set(range(grown[0], grown[1] + 1)):
                break
            wanted |= set(range(grown[0], grown[1] + 1))
        best = own.index(min(own))
        out += [(abs(i - best), number, i, repeats[i]) for i in sorted(wanted)]
    return [entry[-1] for entry in sorted(out, key=lambda entry: entry[:3])]
