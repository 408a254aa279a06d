"""Speedup over a tuned AdamW, the unit of the 2025 optimizer benchmarks (Wen et al.; Semenov et al.).

A ladder is AdamW tuned at each of several lengths of training (configs/sweeps/adamw_ladder.yaml):
at each length T_i, the mean final loss L_i of its best lr over seeds, and that mean's seed range.
For a setup whose mean best final loss at T tokens is L,

    speedup = T_AdamW(L) / T,

where T_AdamW(L) is the tokens the ladder needs to reach L, read off the ladder between its two
rungs that enclose L. How to read between rungs is chosen from the data (`choose_interpolation`):
each way predicts every inner rung's tokens from the others (leave one out), and the way with the
smaller worst error is used; that error is reported beside every speedup. A loss beyond the ladder
gives a bound: below its longest rung's loss, more than T_max / T; above its shortest rung's, less
than T_min / T. The range comes from the seed ranges of both: the setup's worst seed against the
ladder read through its rungs' best seeds gives the low end, and the other way round the high end.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from lm_opt.errors import UserError


@dataclass(frozen=True)
class Rung:
    """AdamW's best lr at one length: its tokens and the mean and seed range of its final loss."""

    tokens: float
    loss: float
    low: float
    high: float


def between_log_tokens(loss: float, a: tuple[float, float], b: tuple[float, float]) -> float:
    """Tokens at `loss` on the line through rungs a and b (tokens, loss) in (log tokens, loss)."""
    (ta, la), (tb, lb) = a, b
    return math.exp(math.log(ta) + (loss - la) * (math.log(tb) - math.log(ta)) / (lb - la))


def between_log_log(loss: float, a: tuple[float, float], b: tuple[float, float]) -> float:
    """Tokens at `loss` on the line through a and b in (log tokens, log loss): a local power law."""
    (ta, la), (tb, lb) = a, b
    return between_log_tokens(math.log(loss), (ta, math.log(la)), (tb, math.log(lb)))


INTERPOLATIONS: dict[str, Callable] = {"linear in log tokens": between_log_tokens,
                                       "power law (linear in log-log)": between_log_log}


def tokens_to_reach(loss: float, points: list[tuple[float, float]], between: Callable) -> float | None:
    """The tokens at which a ladder of (tokens, loss) points, in increasing tokens and decreasing
    loss, reaches `loss`; None where `loss` lies beyond its ends."""
    if not points or loss > points[0][1] or loss < points[-1][1]:
        return None
    for a, b in zip(points, points[1:]):
        if b[1] <= loss <= a[1]:
            return a[0] if a[1] == b[1] else between(loss, a, b)
    return points[0][0]


def falling(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(tokens, loss) points with each loss the lowest reached at or before its tokens."""
    return [(t, min(loss for _, loss in points[:i + 1])) for i, (t, _) in enumerate(points)]


def check_ladder(rungs: list[Rung]) -> list[Rung]:
    """Rungs in order of tokens; the mean loss must fall at every longer length."""
    rungs = sorted(rungs, key=lambda r: r.tokens)
    if len(rungs) < 2:
        raise UserError(f"a speedup needs a ladder of at least 2 lengths, got {len(rungs)}")
    for a, b in zip(rungs, rungs[1:]):
        if not b.loss < a.loss:
            raise UserError(f"the AdamW ladder's loss does not fall from {a.tokens:.0f} tokens ({a.loss:.4f}) to "
                            f"{b.tokens:.0f} ({b.loss:.4f}): a longer rung must reach a lower loss; add seeds or "
                            "bracket its lr grid")
    return rungs


def leave_one_out_error(rungs: list[Rung], between: Callable) -> float:
    """The worst relative error of the tokens predicted for each inner rung from the others."""
    errors = []
    for i in range(1, len(rungs) - 1):
        others = [(r.tokens, r.loss) for j, r in enumerate(rungs) if j != i]
        errors.append(abs(tokens_to_reach(rungs[i].loss, others, between) / rungs[i].tokens - 1))
    return max(errors, default=math.nan)


def choose_interpolation(rungs: list[Rung]) -> tuple[str, dict[str, float]]:
    """The way of reading between rungs with the smaller worst leave-one-out error, and every way's error."""
    rungs = check_ladder(rungs)
    errors = {name: leave_one_out_error(rungs, between) for name, between in INTERPOLATIONS.items()}
    return min(errors, key=lambda name: (math.isnan(errors[name]), errors[name])), errors


@dataclass(frozen=True)
class Speedup:
    """A setup's speedup over the ladder: a value, or a bound ('>' or '<') where its loss is off the ladder."""

    value: float
    bound: str = ""
    """'' for a value read off the ladder; '>' or '<' for a bound at the ladder's end."""
    low: float | None = None
    high: float | None = None
    """The range from both seed ranges; None where an end lies off the ladder."""

    def __str__(self) -> str:
        shown = f"{self.bound} {self.value:.2f}x" if self.bound else f"{self.value:.2f}x"
        if self.bound or self.low is None and self.high is None:
            return shown
        ends = [f"{e:.2f}" if e is not None else "?" for e in (self.low, self.high)]
        return f"{shown} ({ends[0]} .. {ends[1]})"


def speedup(loss: float, low: float, high: float, tokens: float, rungs: list[Rung],
            interpolation: str | None = None) -> Speedup:
    """The speedup of a setup with mean best loss `loss` (seed range `low` .. `high`) at `tokens`."""
    rungs = check_ladder(rungs)
    between = INTERPOLATIONS[interpolation or choose_interpolation(rungs)[0]]
    means = [(r.tokens, r.loss) for r in rungs]
    reached = tokens_to_reach(loss, means, between)
    if reached is None:
        return Speedup(rungs[-1].tokens / tokens, ">") if loss < means[-1][1] else Speedup(rungs[0].tokens / tokens, "<")
    # The ladder through its rungs' best seeds reaches a loss sooner, through their worst later
    # (each made monotone: seed ranges need not fall as the means do).
    fast, slow = falling([(r.tokens, r.low) for r in rungs]), falling([(r.tokens, r.high) for r in rungs])
    slowest_setup, fastest_setup = tokens_to_reach(high, fast, between), tokens_to_reach(low, slow, between)
    return Speedup(reached / tokens, "", None if slowest_setup is None else slowest_setup / tokens,
                   None if fastest_setup is None else fastest_setup / tokens)
