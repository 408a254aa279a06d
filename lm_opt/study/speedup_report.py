"""The report's speedup section: each line's best point read against the AdamW ladder of its model.

The ladder is the sweep `adamw_ladder` beside the reported one (configs/sweeps/adamw_ladder.yaml),
its lengths told apart by their labels (`adamw_steps<N>`). A line gets a speedup where the ladder
ran the same model on the same data (`model_shape`) and holds at least two lengths whose best
point ran with several seeds; each line is read at its own tokens.
"""

import json
from pathlib import Path

from lm_opt.record import read_summary
from lm_opt.study.rows import Row, load_rows, panelled, series_key, x_axis
from lm_opt.study.speedup import Rung, choose_interpolation, speedup
from lm_opt.study.stats import findings, seed_noise, stability
from lm_opt.study.sweep_plan import format_value

LADDER = "adamw_ladder"
LADDER_PANEL = ("steps", r"_steps(\d+)$")
SHAPE_KEYS = {"model": ("preset", "arch", "qk_norm", "z_loss"),
              "data": ("path", "tokenizer", "embedded_vocab", "seq_len", "batch_size", "train_documents")}
"""What a line must share with the ladder to be read against it: the model and the data it trains on."""


def model_shape(run_dir: Path) -> str | None:
    """The model and data of a run, as one comparable string; None for a run without a resolved config."""
    config = read_summary(run_dir).config
    if not config:
        return None
    return json.dumps({part: {k: config.get(part, {}).get(k) for k in keys} for part, keys in SHAPE_KEYS.items()},
                      sort_keys=True)


def best_lines(rows: list[Row], margin: float) -> list[dict]:
    """Each line's best point with several seeds: its findings entry, tokens and model shape."""
    out = []
    for entry in findings(stability(rows, margin), seed_noise(rows)):
        runs = [r for r in rows if series_key(r) == (entry["optimizer"], entry["condition"])
                and format_value(r.values.get(x_axis(r))) == format_value(entry["best_x"]) and r.tokens]
        if runs:
            out.append({**entry, "tokens": runs[0].tokens, "shape": model_shape(runs[0].run_dir)})
    return out


def ladder_rungs(ladder_dir: Path, margin: float) -> dict[str, list[Rung]]:
    """The ladder's rungs by model shape (a ladder may hold more than one width)."""
    rungs: dict[str, list[Rung]] = {}
    for line in best_lines(panelled(load_rows(ladder_dir), *LADDER_PANEL), margin):
        rungs.setdefault(line["shape"], []).append(Rung(line["tokens"], line["mean"], line["min"], line["max"]))
    return rungs


def speedup_section(rows: list[Row], sweep_dir: Path, margin: float) -> list[str]:
    """Markdown: the speedup of each line whose model the ladder beside `sweep_dir` ran; empty where none."""
    ladder_dir = sweep_dir.parent / LADDER
    if not ladder_dir.is_dir() or sweep_dir.resolve() == ladder_dir.resolve():
        return []
    ladders = {shape: r for shape, r in ladder_rungs(ladder_dir, margin).items() if len(r) >= 2}
    lines = [line for line in best_lines(rows, margin) if line["shape"] in ladders]
    if not lines:
        return []
    out = [f"## Speedup over a tuned AdamW ({LADDER})", "",
           "The tokens the AdamW ladder needs to reach each line's mean best final loss, divided by the tokens the "
           "line trained on (above 1: faster than AdamW tuned at every length); in brackets the range from both "
           "seed ranges, `?` where an end lies off the ladder; `>` and `<` bound a loss beyond the ladder's ends. "
           "Between rungs the ladder is read as its leave-one-out error (the worst relative error of the tokens "
           "predicted for a rung left out) chooses.", "",
           "| optimizer | condition | tokens | mean (range) | speedup | read between rungs as | its error |",
           "|" + " --- |" * 7]
    for line in lines:
        rungs = ladders[line["shape"]]
        chosen, errors = choose_interpolation(rungs)
        result = speedup(line["mean"], line["min"], line["max"], line["tokens"], rungs, chosen)
        error = f"{errors[chosen]:.1%}" if errors[chosen] == errors[chosen] else "needs 3 rungs"
        out.append(f"| {line['optimizer']} | {line['condition']} | {line['tokens']:,} | {line['mean']:.4f} "
                   f"({line['min']:.4f} .. {line['max']:.4f}) | {result} | {chosen} | {error} |")
    return out + [""]


def describe_shape(shape: str | None) -> str:
    """A model shape in words: `the cpu preset at {'n_embd': 128}, seq_len 128 x batch 16`."""
    if shape is None:
        return "a run without a resolved config"
    parts = json.loads(shape)
    arch = parts["model"]["arch"]
    return (f"the {parts['model']['preset']} preset" + (f" at {arch}" if arch else "")
            + f", {parts['data']['seq_len']} x {parts['data']['batch_size']} tokens a step")


def card_speedup_lines(line: dict, ladder_dir: Path, margin: float) -> list[str]:
    """A card's speedup at its own horizon (`line`: card_write.line_stats of its optimizer), or which
    ladder it lacks."""
    stats, runs = line.get("stats", {}), line.get("runs", [])
    if "mean" not in stats or not runs:
        return []
    shape, tokens = model_shape(runs[0].run_dir), runs[0].tokens
    ladders = ladder_rungs(ladder_dir, margin) if ladder_dir.is_dir() else {}
    rungs = ladders.get(shape, [])
    head = ["## Speedup over a tuned AdamW", ""]
    if len(rungs) < 2:
        held = "; ".join(describe_shape(s) for s, r in ladders.items() if len(r) >= 2) or "no model yet"
        return head + [f"No AdamW ladder of this card's model ({describe_shape(shape)}): {ladder_dir} holds {held}. "
                       "Run configs/sweeps/adamw_ladder.yaml with this model's overrides for a speedup.", ""]
    chosen, errors = choose_interpolation(rungs)
    result = speedup(stats["mean"], stats["min"], stats["max"], tokens, rungs, chosen)
    return head + [f"At {tokens:,} tokens the card's mean best final loss {stats['mean']:.4f} is a speedup of "
                   f"**{result}** over AdamW tuned at each length ({ladder_dir}, read {chosen}, leave-one-out "
                   f"error {errors[chosen]:.1%}).", ""]
