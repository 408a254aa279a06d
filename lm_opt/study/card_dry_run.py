"""`python -m lm_opt card OPTIMIZER_YAML --dry-run`: what a card would run on this machine and about
how long it would take, with nothing trained and nothing written.

The YAML is checked as the card checks it before its first run (each point of the first lr grid
parsed as a `fit` command and its optimizer built). Then the plan: the grid and its growth, the
seeds, the beta1 line, which committed baselines the card would read and which it would rerun on
this CPU kind (Card.baselines), and which points are done already in the card's folder or would be
copied from records made here (lm_opt.study.reuse). The wall clock is estimated from this machine's
step time: the median of the records of the card's own grid held here where there are any (done in
its folder, or runs of the very config made on this CPU), else a few steps of the card's optimizer
timed now.
The estimate counts training steps; each run's start and validations come on top.
"""

import copy
import logging
import statistics
import warnings
from pathlib import Path

from lm_opt.precision import cpu_arithmetic, describe
from lm_opt.record import read_summary
from lm_opt.study.card import Card, optimizer_callback, run_shape
from lm_opt.study.card_plan import lr_value
from lm_opt.study.reuse import run_key
from lm_opt.study.sweep import check_one_cpu_kind, point_state, threads_per_job
from lm_opt.study.sweep_plan import Point, format_value, with_seed

TIMED_WARMUP, TIMED_STEPS = 2, 5
"""The steps a dry run times where no record of the card's grid was made here: a few seconds."""


def resolve_points(card: Card, points: list[Point]) -> list[Point]:
    """Each point's resolved config: parsed once per lr (Card.checked), and copied for its seed
    repeats, whose configs differ in the seed alone (a dry run stays within seconds)."""
    parsed = {x.name: x for x in card.checked([x for x in points if "seed" not in x.values])}
    for x in points:
        if "seed" in x.values:
            x.resolved = {**copy.deepcopy(parsed[x.name.removesuffix(f"_seed{x.values['seed']}")].resolved),
                          "seed_everything": x.values["seed"]}
    return points


def held(points: list[Point], known: dict[str, Path]) -> dict[Path, Path]:
    """Point folder -> its record, for the points a card would not run: done in its own folder, or
    of the config of a done run made here (copied, as `sweep` copies them)."""
    out = {}
    for point in points:
        if point_state(point.run_dir) == "done":
            out[point.run_dir] = point.run_dir
        elif (source := known.get(run_key(point.resolved))) is not None:
            out[point.run_dir] = source
    return out


def held_lines(card: Card, records: dict[Path, Path]) -> list[str]:
    """The points done in the card's folder on one line, then each copy with its source."""
    done = [str(run.relative_to(card.dir)) for run, record in records.items() if run == record]
    lines = [f"- done in {card.dir}: {', '.join(done)}"] if done else []
    return lines + [f"- {run.relative_to(card.dir)}: copied from {record}" for run, record in records.items()
                    if run != record]


def step_time(card: Card, point: Point, records: list[Path], threads: int) -> tuple[float, str]:
    """Seconds per training step here, and where the number comes from: the median of the `records`
    of the card's own grid held on this CPU kind, else `point`'s steps timed now."""
    times = [s for path in records if (s := read_summary(path).step_time_s)]
    if times:
        return statistics.median(times), (f"the median of {len(times)} records of this card's grid held here "
                                           f"({describe(cpu_arithmetic())}), e.g. {records[0]}")
    return timed_step(card, point, threads)


def timed_step(card: Card, point: Point, threads: int) -> tuple[float, str]:
    """Seconds per step of `point`'s optimizer, model and batch timed over a few steps on random
    tokens (lm_opt.study.step_time) with the threads each of the card's jobs gets, and how."""
    import torch

    from lm_opt.module import LMModule
    from lm_opt.study.step_time import train_steps

    shape = run_shape(point.resolved)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    logging.disable(logging.INFO)  # Lightning's and the routing table's lines would bury the plan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            window = train_steps(LMModule(preset=shape["preset"]), card.precision,
                                 optimizer_callback(point.optimizer_yaml, point.name), shape["batch_size"],
                                 shape["seq_len"], TIMED_WARMUP, TIMED_STEPS)
    finally:
        torch.set_num_threads(previous)
        logging.disable(logging.NOTSET)
    return window.seconds_per_step, (
        f"timed now: {TIMED_STEPS} steps of the card's optimizer at lr {format_value(point.values['lr'])} after "
        f"{TIMED_WARMUP} warmup steps, random tokens ({shape['preset']} preset, batch {shape['batch_size']} x "
        f"{shape['seq_len']}, {threads} thread(s), {card.precision})")


def plan_lines(card: Card, grid: list[Point]) -> list[str]:
    """The protocol's runs in words: the grid, how it grows, the seeds, the beta1 line."""
    p, trainer = card.protocol, grid[0].resolved["trainer"]
    low, high = lr_value(card.center, card.ks[0] - p.max_extend), lr_value(card.center, card.ks[-1] + p.max_extend)
    lines = [f"card {card.name} (dry run): {card.config} on {', '.join(p.base)}, {trainer['max_steps']} steps, "
             f"validation every {trainer['val_check_interval']} steps, {card.precision} on this CPU "
             f"({describe(cpu_arithmetic())}); its folder would be {card.dir}",
             f"- lr grid, seed 0: {', '.join(format_value(x.values['lr']) for x in grid)} ({len(grid)} points in "
             f"quarter decades around the YAML's lr {card.center:g})",
             f"- grown one quarter decade at a time until the best lr has a finished neighbour on each side and the "
             f"range within {p.margin:g} nats of the best ends inside the grid: at most {p.max_extend} more on each "
             f"side ({format_value(low)} .. {format_value(high)})",
             f"- the grid again under seeds {p.grid_seeds}; seeds {p.best_seeds} more at the best lr"]
    if card.has_beta1 and p.beta1:
        lines.append(f"- beta1 over {list(p.beta1)} at the best lr; seeds {p.beta1_seeds} more at the best beta1")
    else:
        lines.append("- no beta1 line: the optimizer has no `betas` or `momentum`" if p.beta1 else "- no beta1 line")
    return lines


def baseline_lines(card: Card) -> tuple[list[str], list[Point], int]:
    """Which committed baselines the card would read; the baseline points it would rerun here, and
    how many runs more it would add once they are done (seeds at the best of AdamW's grid)."""
    usable = card.baselines()
    lines = ["baselines, read only where made on this CPU kind and precision:"]
    lines += [f"- logs/sweeps/{sweep}: {'read' if ok else 'not read'}, {why}" for sweep, (ok, why) in usable.items()]
    if usable["cpu_lr"][0]:
        return lines, [], 0
    p = card.protocol
    points = resolve_points(card, card.baseline_points())
    later = len(p.best_seeds) if card.baseline_grid else 0
    what = ("cpu_lr's AdamW grid under seeds 0, " + ", ".join(map(str, p.grid_seeds))
            + f", then seeds {p.best_seeds} at its best" if card.baseline_grid
            else f"lr {p.baseline_lr:g}, seeds 0, {', '.join(map(str, p.grid_seeds + p.best_seeds))}")
    lines.append(f"- so AdamW reruns here into {card.dir / 'baselines'}: {len(points) + later} runs ({what})")
    return lines, points, later


def run_counts(card: Card, grid: list[Point]) -> tuple[int, int]:
    """The card's own runs (baselines apart) if its first grid brackets the best, and if the grid
    grows to the protocol's limit on both sides."""
    p = card.protocol
    per_lr = 1 + len(p.grid_seeds)
    rest = len(p.best_seeds) + (len(p.beta1) + len(p.beta1_seeds) if card.has_beta1 and p.beta1 else 0)
    return len(grid) * per_lr + rest, (len(grid) + 2 * p.max_extend) * per_lr + rest


def dry_run(card: Card) -> None:
    """Check the card's YAML, print its plan and the estimate; trains nothing and writes nothing."""
    grid = card.checked(card.grid())
    check_one_cpu_kind(grid)
    threads, p = threads_per_job(card.jobs), card.protocol
    first = resolve_points(card, grid + [with_seed(x, s) for s in p.grid_seeds for x in grid])
    more, base_points, later = baseline_lines(card)
    known = card.reusable()
    mine, theirs = held(first, known), held(base_points, known)
    lines = plan_lines(card, grid) + more
    lines.append(f"already held: {len(mine)} of the first grid's {len(first)} runs (seed 0 and the grid seeds)"
                 + (f", {len(theirs)} of the {len(base_points)} baseline runs" if base_points else ""))
    lines += held_lines(card, {**mine, **theirs})
    seconds, source = step_time(card, grid[len(grid) // 2], list(mine.values()), threads)
    steps, timing = grid[0].resolved["trainer"]["max_steps"], 2 * p.timing_rounds * (p.timing_warmup + p.timing_steps)
    runs = [n - len(mine) + len(base_points) + later - len(theirs) for n in run_counts(card, grid)]
    hours = [(n * steps / card.jobs + timing) * seconds / 3600 for n in runs]
    lines += [f"step time: {seconds:.3f} s, {source}",
              f"estimated wall clock: {hours[0]:.1f} h to {hours[1]:.1f} h at --jobs {card.jobs} ({threads} "
              f"thread(s) each): {runs[0]} to {runs[1]} runs to make x {steps} steps (the more if the grid grows to "
              f"its limit on both sides), plus the side-by-side step timing ({timing} steps); each run's start and "
              "validations come on top",
              "dry run: nothing trained, nothing written"]
    print("\n".join(lines), flush=True)
