"""The protocol of an optimizer's card (`python -m lm_opt card`): its sizes, its lr grid and how the
grid grows, which baselines it may read, and the study's verdicts.

The protocol is the CPU study's as `configs/sweeps/cpu_lr.yaml` and `cpu_beta1.yaml` run it: the
quickstart's setup for 200 steps, a quarter-decade lr grid under 2 grid seeds, 3 seeds at the best
lr, and beta1 over the study's values at the best lr. Everything here is pure (no training), so
that the rules are tested on fake records.

Validation runs every 50 steps, as in `cpu_lr`: a card's point is then the very config of a
`cpu_lr` point (a card of `configs/optim/adamw.yaml` reuses `cpu_lr`'s records on the machine kind
that made them), and AdamW's loss at step 100, one of the two step targets, is a validation of its
own rather than an interpolation. Steps to a target are read off the curve between validations
(lm_opt.study.target), so their resolution is that of the 50-step spacing; the card says so.
"""

import math
from dataclasses import dataclass, field

from lm_opt.precision import describe, same_kind
from lm_opt.study.sweep_plan import DONE

ADAMW_YAML = "configs/optim/adamw.yaml"
REFERENCE = "adamw"
"""The setup every card is compared with, as the study compares with Adam."""

STUDY_BETA1 = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
"""cpu_beta1's values (the study's)."""
ADAMW_BEST_LR = 5.62e-3
"""AdamW's best lr in `cpu_lr` (mean over 3 seeds 5.701): the baseline point a card reruns."""
CPU_OVERRIDES = {"data.num_workers": 1, "trainer.max_steps": 200, "trainer.val_check_interval": 50,
                 "trainer.enable_progress_bar": False}
"""cpu_lr's overrides of configs/quickstart.yaml."""


@dataclass
class Protocol:
    """The sizes of a card's runs; a test shrinks them to a micro scale."""

    base: list[str] = field(default_factory=lambda: ["configs/quickstart.yaml"])
    """Base configs of every run."""
    overrides: dict = field(default_factory=lambda: dict(CPU_OVERRIDES))
    """`--key value` of every run."""
    half_width: int = 3
    """The first grid: the YAML's lr x 10^(k/4) for k = -half_width .. half_width."""
    max_extend: int = 6
    """Quarter-decades the grid may grow by on each side before the card gives up bracketing."""
    grid_seeds: list[int] = field(default_factory=lambda: [1])
    """The whole grid again under these seeds: the stable width's noise (F2)."""
    best_seeds: list[int] = field(default_factory=lambda: [2])
    """More seeds at the best lr; with seed 0 and the grid seeds, 3 in all."""
    beta1: list[float] = field(default_factory=lambda: list(STUDY_BETA1))
    """beta1 (momentum) at the best lr, where the optimizer has one."""
    beta1_seeds: list[int] = field(default_factory=lambda: [1, 2])
    """More seeds at the best beta1 (cpu_beta1's)."""
    margin: float = 0.1
    """Nats above the best that count as stable (F2's and F3's measure)."""
    grid_step: float = 0.25
    """The grid's step in decades: F2's tolerance beyond the widths' seed spread."""
    baseline_lr: float = ADAMW_BEST_LR
    """AdamW's point where the baselines are rerun."""
    timing_steps: int = 20
    """Timed steps per round of the side-by-side step-time run (after `timing_warmup`)."""
    timing_warmup: int = 3
    timing_rounds: int = 5
    ladder_spec: str = "configs/sweeps/adamw_ladder.yaml"
    """The AdamW ladder whose model, data and precision `--horizons` runs at, and whose records it reads."""


def lr_value(center: float, k: int) -> float:
    """`center` x 10^(k/4) to 3 significant digits. A center on the quarter-decade grid (1.0, 1.78,
    3.16, 5.62 x 10^n) gives that grid's values (1e-2, not 9.99e-3, a half decade above 3.16e-3)."""
    q = 4 * math.log10(center)
    exact = 10 ** ((round(q) + k) / 4) if abs(q - round(q)) < 0.01 else center * 10 ** (k / 4)
    return float(f"{exact:.3g}")


def extension(results: dict[int, dict], margin: float) -> tuple[int | None, str]:
    """The next quarter-decade step k to run, or None, and why, from the summaries of the grid's
    points by k (status and final_val_loss). First the best point needs a finished neighbour on both
    sides, or a diverged one above it (the high side diverges): a best point at an end of the grid
    grows the grid there, and a grid that diverged everywhere grows downward. Then F2's stable range
    (within `margin` of the best) needs an end on both sides: an end point of the grid within the
    margin grows the grid past it, so that the width is measured, not a lower bound."""
    if any(r.get("status") not in DONE for r in results.values()):
        return None, "not done: a point crashed or has not run"
    finished = {k: r["final_val_loss"] for k, r in results.items()
                if r["status"] == "finished" and r.get("final_val_loss") is not None}
    ks = sorted(results)
    if not finished:
        return ks[0] - 1, "every point diverged: one quarter-decade lower"
    best = min(finished, key=finished.get)
    if best == ks[-1]:
        return best + 1, "the best lr is the grid's highest: one quarter-decade higher"
    if best == ks[0]:
        return best - 1, "the best lr is the grid's lowest: one quarter-decade lower"
    if best - 1 not in finished:
        return None, "not bracketed: the lr below the best diverged"
    stable = [k for k, loss in finished.items() if loss <= finished[best] + margin]
    if ks[-1] in stable:
        return ks[-1] + 1, f"the range within {margin:g} nats of the best reaches the grid's highest lr: one higher"
    if ks[0] in stable:
        return ks[0] - 1, f"the range within {margin:g} nats of the best reaches the grid's lowest lr: one lower"
    if best + 1 not in finished:
        return None, "bracketed below by a finished point; the high side diverges"
    return None, "bracketed: a finished neighbour on both sides, and the stable range ends inside the grid"


def record_kind(summaries: list[dict]) -> tuple[dict | None, str | None, str | None]:
    """The CPU arithmetic and precision the done records share, or a reason they have none."""
    done = [s for s in summaries if s.get("status") in DONE]
    if not done:
        return None, None, "no done records"
    kinds = [((s.get("provenance") or {}).get("device") or {}) for s in done]
    first = kinds[0]
    if any(d.get("type") != "cpu" for d in kinds):
        return None, None, "records not made on a CPU"
    if any(not same_kind(d.get("arithmetic"), first.get("arithmetic")) or d.get("precision") != first.get("precision")
           for d in kinds):
        return None, None, "records made on several CPU kinds or precisions"
    return first.get("arithmetic"), first.get("precision"), None


def baseline_usable(summaries: list[dict], arithmetic: dict, precision: str) -> tuple[bool, str]:
    """Whether a committed sweep's records may be compared with runs made here (this CPU's
    `arithmetic`, `precision`): the same kind (lm_opt.precision.same_kind) and precision; and why."""
    theirs, their_precision, problem = record_kind(summaries)
    if problem:
        return False, problem
    made = f"{describe(theirs)}, {their_precision}"
    if not same_kind(theirs, arithmetic):
        return False, f"made on another CPU kind ({made}; here {describe(arithmetic)}, {precision})"
    if their_precision != precision:
        return False, f"made in another precision ({made}; here {precision})"
    return True, f"made on this CPU kind and precision ({made})"


def loss_verdict(mine: dict, adam: dict) -> str:
    """The study's words for two seed statistics (min, max, mean): ranges that overlap are
    "comparable to Adam" (lm_opt.study.report.ranges_apart)."""
    from lm_opt.study.stats import ranges_apart

    if not ranges_apart(mine, adam):
        return "comparable to Adam"
    return "better beyond noise" if mine["mean"] < adam["mean"] else "worse beyond noise"


def stability_verdict(mine: list[float | None], adam: list[float | None], grid_step: float) -> tuple[str, str]:
    """F2's rule (README): a difference of the mean widths of the stable lr range (decades, one per
    grid seed) beyond the measure's seed spread (the larger of the two lines' max - min) plus one
    grid step. Returns the verdict and the numbers it rests on."""
    if not mine or not adam or None in mine or None in adam:
        return "not measured", "a width is missing (a grid not done, or a range not bounded by the grid)"
    # Widths are whole grid steps but for the lr values' 3-digit rounding (log10(0.01 / 0.00178) =
    # 0.7496): to 2 decimals, so that the rounding never decides a verdict at the tolerance's edge.
    mine, adam = [round(w, 2) for w in mine], [round(w, 2) for w in adam]
    spread = max(max(mine) - min(mine), max(adam) - min(adam))
    difference = sum(mine) / len(mine) - sum(adam) / len(adam)
    detail = (f"width difference {difference:+.2f} decades against a tolerance of {spread + grid_step:.2f} "
              f"(seed spread {spread:.2f} + one grid step {grid_step})")
    if difference < -(spread + grid_step):
        return "less stable", detail
    if difference > spread + grid_step:
        return "more stable", detail
    return "as stable as Adam", detail


def loss_at(curve: list[list[float]] | None, step: float) -> float | None:
    """The validation curve's loss at `step`, linear between validations; None outside it."""
    points = curve or []
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0) if s1 > s0 else l1
    return next((loss for s, loss in points if s == step), None)
