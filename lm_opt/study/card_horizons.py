"""`card --horizons 200,800,3200`: a card's optimizer along the length of training, beside the AdamW
ladder (configs/sweeps/adamw_ladder.yaml, AdamW tuned at every length).

At each length the optimizer runs at the ladder's model, data and precision (the ladder spec's
`overrides`), so that its loss reads against the ladder's directly. Its lr is retuned at every
length: the grid grows as the card's does until bracketed (lm_opt.study.card_plan.extension), at
the first length around the YAML's lr, at each later one around the best of the length before, as
the best lr moves with the length. Then 3 seeds at each best (the protocol's grid and best seeds).
Each length is compared at the end of its own schedule, the validation and checkpoint intervals
scaled to it (lm_opt.study.sweep_plan.scale_to_length).
"""

import argparse
from pathlib import Path

from lm_opt.study.card_plan import lr_value
from lm_opt.study.sweep_plan import Point, SpecError, load_spec, plan, with_seed


def horizon_list(text: str) -> list[int]:
    """`--horizons 200,800,3200`: distinct positive step counts."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs steps separated by commas, e.g. 200,800,3200, got {text!r}") from None
    if any(s < 1 for s in steps) or len(set(steps)) < len(steps):
        raise argparse.ArgumentTypeError(f"needs distinct positive steps, got {text!r}")
    return steps


def ladder_overrides(ladder_spec: str) -> dict:
    """The ladder spec's overrides: the model, data, precision and reference intervals of every length."""
    if not Path(ladder_spec).is_file():
        raise SpecError(f"--horizons reads the AdamW ladder's spec {ladder_spec!r}, which does not exist")
    return load_spec(ladder_spec)["overrides"]


def horizon_points(card, steps: int, center: float, ks: list[int], overrides: dict) -> list[Point]:
    """The card's lr grid at `steps`, in `horizons/` of its folder, labelled `<name>_steps<N>`, with
    the ladder's `overrides` (`ladder_overrides`)."""
    from lm_opt.study.card import spec_of

    values = [lr_value(center, k) for k in ks]
    # Hyperparameters counted in steps of the run (AdEMAMix's t_alpha_beta3) take each length's own.
    own = {f"optimizer.init_args.{key}": steps for key in card.length_keys}
    spec = spec_of(card.name, card.dir / "horizons", card.protocol, f"{card.name}_steps{steps}", card.config,
                   {"lr": values}, {"trainer.max_steps": steps, **own})
    spec.update(overrides=dict(overrides), scales_length=True)
    return plan(spec)


def run_horizons(card) -> list[dict]:
    """Each length's grid, grown until bracketed, and its best point with the protocol's seeds."""
    from lm_opt.study.card import best_name

    center, half_width, out = card.center, card.protocol.half_width, []
    seeds = [*card.protocol.grid_seeds, *card.protocol.best_seeds]
    overrides = ladder_overrides(card.protocol.ladder_spec)  # read once, not at every growth round
    for steps in card.horizons:
        grid, _ = card.grow(lambda ks, steps=steps, center=center: horizon_points(card, steps, center, ks, overrides),
                            list(range(-half_width, half_width + 1)), center, f"{card.name}_horizons")
        best = next((p for p in grid if p.name == best_name(grid)), None)
        if best is None:
            card.log.append(f"{steps} steps: no finished grid point; the longer lengths are not run")
            break
        card.run(card.checked([with_seed(best, s) for s in seeds]), f"{card.name}_horizons")
        out.append({"steps": steps, "grid": grid, "best": best})
        center, half_width = best.values["lr"], 1
    return out


def gap_trend(first: dict, last: dict) -> str:
    """Whether the gap to AdamW (card mean - ladder mean) moved beyond noise between two lengths: the
    gap's range pairs each side's seed extremes, and the two lengths' ranges must not overlap."""
    low = [e["min"] - e["rung"].high for e in (first, last)]
    high = [e["max"] - e["rung"].low for e in (first, last)]
    gaps = [e["mean"] - e["rung"].loss for e in (first, last)]
    moved = f"{gaps[0]:+.4f} nats at {first['steps']} steps to {gaps[1]:+.4f} at {last['steps']}"
    if low[1] > high[0] or high[1] < low[0]:
        word = "shrinks" if abs(gaps[1]) < abs(gaps[0]) else "grows"
        return f"The gap to AdamW {word} beyond noise: from {moved}."
    return f"The gap to AdamW stays within noise: from {moved} (the gaps' seed ranges overlap)."


def horizon_lines(card, margin: float) -> list[dict]:
    """Each length's best point (mean and range over seeds, tokens, epochs) with the ladder's rung of
    the same model and tokens, where the ladder has one."""
    from lm_opt.record import read_summary
    from lm_opt.study.rows import load_rows, panelled
    from lm_opt.study.speedup_report import LADDER, ladder_rungs, best_lines

    folder = card.dir / "horizons"
    if not folder.is_dir():
        return []
    ladder = card.dir.parent.parent / "sweeps" / LADDER
    rungs = ladder_rungs(ladder, margin) if ladder.is_dir() else {}
    out = []
    for line in best_lines(panelled(load_rows(folder), "steps", r"_steps(\d+)$"), margin):
        steps = int(line["condition"].split("=")[1])
        summary = read_summary(folder / line["best_point"])
        mine = rungs.get(line["shape"], [])
        rung = next((r for r in mine if r.tokens == line["tokens"]), None)
        out.append({**line, "steps": steps, "rung": rung, "rungs": mine, "epochs": summary.epochs,
                    "parameters": summary.parameters})
    return sorted(out, key=lambda e: e["steps"])


def horizon_section(card, margin: float) -> list[str]:
    """card.md's section along the horizon: each length against the ladder, the speedups, the trend,
    and what the longest length can speak to."""
    from lm_opt.study.speedup import choose_interpolation, speedup
    from lm_opt.study.speedup_report import describe_shape

    lines = horizon_lines(card, margin)
    if not lines:
        return []
    out = ["## Along the horizon", "",
           f"At the AdamW ladder's model ({describe_shape(lines[0]['shape'])}; {card.protocol.ladder_spec}), the lr "
           "retuned at each length (grown until bracketed), 3 seeds at each best, each length read at the end of "
           "its own schedule beside the ladder's AdamW at the same length. Speedup: the tokens the ladder needs to "
           "reach the mean best loss, over the tokens used.", "",
           "| steps | tokens | epochs | best lr | mean (range) | AdamW at this length | difference | speedup |",
           "|" + " --- |" * 8]
    for e in lines:
        rung, epochs = e["rung"], "< 1" if e["epochs"] is None else f"{e['epochs']:.2f}"
        adamw = f"{rung.loss:.4f} ({rung.low:.4f} .. {rung.high:.4f})" if rung else "not in the ladder"
        difference = f"{e['mean'] - rung.loss:+.4f}" if rung else ""
        shown = ""
        if len(e["rungs"]) >= 2:
            shown = str(speedup(e["mean"], e["min"], e["max"], e["tokens"], e["rungs"], choose_interpolation(e["rungs"])[0]))
        out.append(f"| {e['steps']} | {e['tokens']:,} | {epochs} | {e['best_x']:.3g} | {e['mean']:.4f} "
                   f"({e['min']:.4f} .. {e['max']:.4f}) | {adamw} | {difference} | {shown} |")
    compared = [e for e in lines if e["rung"]]
    out += [""] + ([gap_trend(compared[0], compared[-1]), ""] if len(compared) >= 2 else [])
    longest = lines[-1]
    if longest["parameters"]:
        out += [f"The longest length trains {longest['tokens']:,} tokens, {longest['tokens'] / longest['parameters']:.1f} "
                f"per parameter of this model ({longest['parameters']:,}, embeddings included): the card can speak to "
                "a claim about runs up to that length at this scale, not to a claim made at the scale of the paper's "
                "runs (billions of tokens, 20 or more tokens per parameter).", ""]
    return out
