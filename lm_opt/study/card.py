"""`python -m lm_opt card OPTIMIZER_YAML [--jobs N] [--name NAME] [--out logs/cards] [--dry-run]`: an
through the CPU study's protocol, and its card beside the study's optimizers.

The card's folder `out/<name>/` is a sweep folder (`sweep`'s point folders, with their
`command.sh` and point record, so that `recheck` works on them and a rerun resumes and skips done
points) holding the lr grid, its grid seeds, the seeds at the best lr and the beta1 line, plus
`card.md`, `results.csv` and the figures. The protocol and its rules are in
lm_opt.study.card_plan; the writing in lm_opt.study.card_write.

Baselines come from the committed sweeps (`logs/sweeps/cpu_lr`, `cpu_beta1`, `soap_cpu`) only
where their records were made on this CPU kind and in the precision the card runs in. Elsewhere
the card reruns AdamW's best point of `cpu_lr` with 3 seeds (`--baseline-grid`: its whole lr grid
too) into `out/<name>/baselines/`, and compares nothing with records of another kind.
"""

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

from lm_opt.precision import cpu_arithmetic, resolve
from lm_opt.study.card_horizons import horizon_list, ladder_overrides, run_horizons
from lm_opt.study.card_plan import ADAMW_YAML, REFERENCE, Protocol, baseline_usable, extension, lr_value
from lm_opt.record import read_summary
from lm_opt.study.reuse import known_runs
from lm_opt.study.sweep import (WhenDone, check_one_cpu_kind, commit_files, execute, prepare, seed_points,
                                threads_per_job)
from lm_opt.study.sweep_plan import (Point, SpecError, callback_init_args, command_endings, get_path, optimizer_path,
                                     plan, validate, with_seed)
from lm_opt.user_yaml import read_yaml

COMMITTED = Path("logs/sweeps")
BASELINE_SWEEPS = ("cpu_lr", "cpu_beta1", "soap_cpu")


def spec_of(name: str, out_dir: Path, protocol: Protocol, label: str, config: str, grid: dict,
            overrides: dict | None = None) -> dict:
    """A sweep spec (as lm_opt.study.sweep_plan.load_spec returns it) of one optimizer line."""
    return {"name": name, "out_dir": out_dir, "base": list(protocol.base), "grid": {}, "seeds": [], "grid_seeds": [],
            "overrides": dict(protocol.overrides),
            "optimizers": {label: {"config": config, "grid": grid, "overrides": overrides or {}}}}


def optimizer_lr(config: str) -> tuple[float, bool]:
    """The YAML's lr (of its optimizer, or its first route) and whether it has a beta1 (`betas` or
    `momentum`); SpecError where it has no readable OptimizerCallback or lr."""
    if not Path(config).is_file():
        raise SpecError(f"optimizer YAML {config!r} does not exist")
    try:
        source = read_yaml(config)
    except yaml.YAMLError as err:
        raise SpecError(f"{config}: invalid YAML: {err}") from None
    if not isinstance(source, dict):
        raise SpecError(f"{config}: needs a mapping with trainer.callbacks holding an OptimizerCallback")
    init_args = callback_init_args(source, config)
    lr = get_path(init_args, optimizer_path("lr", init_args, config), config)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
        raise SpecError(f"{config}: the optimizer's lr must be a positive number, got {lr!r}")
    try:
        optimizer_path("beta1", init_args, config)
    except SpecError:
        return float(lr), False
    return float(lr), True


class Card:
    """The runs of one card: its grid (by quarter-decade step k), seeds, beta1 line and baselines."""

    def __init__(self, config: str, name: str, out_root: Path, protocol: Protocol, jobs: int,
                 baseline_grid: bool = False, commit: bool = False, horizons: list[int] = (),
                 length_keys: list[str] = ()):
        self.config, self.name, self.protocol, self.jobs, self.commit = config, name, protocol, jobs, commit
        self.horizons, self.length_keys = sorted(horizons), list(length_keys)
        self.dir = out_root / name
        self.center, self.has_beta1 = optimizer_lr(config)
        self.ks: list[int] = list(range(-protocol.half_width, protocol.half_width + 1))
        self.log: list[str] = []
        self.problems: dict[str, str] = {}
        self.baseline_grid = baseline_grid
        self.resolved: dict[str, dict] = {}
        self.precision = resolve(requested_precision(protocol), "cpu").precision

    @property
    def committed(self) -> Path:
        """Where the study's committed sweeps are, the baselines' source."""
        return COMMITTED

    def checked(self, points: list[Point]) -> list[Point]:
        """The points, each one's whole `fit` command parsed (sweep_plan.validate) once."""
        for point in points:
            if point.name not in self.resolved:
                self.resolved[point.name] = validate(point)
            point.resolved = self.resolved[point.name]
        return points

    def grid(self, ks: list[int] | None = None) -> list[Point]:
        values = [lr_value(self.center, k) for k in (self.ks if ks is None else ks)]
        return plan(spec_of(self.name, self.dir, self.protocol, self.name, self.config, {"lr": values}))

    def beta1_points(self, best_lr: float) -> list[Point]:
        spec = spec_of(self.name, self.dir, self.protocol, f"{self.name}_beta1", self.config,
                       {"beta1": list(self.protocol.beta1)}, {"lr": best_lr})
        return plan(spec)

    def baselines(self) -> dict[str, tuple[bool, str]]:
        """Each committed baseline sweep -> whether its records may be compared here, and why."""
        out = {}
        for sweep in BASELINE_SWEEPS:
            summaries = [{"status": s.status, "provenance": s.provenance}
                         for s in map(read_summary, sorted((COMMITTED / sweep).glob("*"))) if s.status]
            out[sweep] = baseline_usable(summaries, cpu_arithmetic(), self.precision)
        return out

    def baseline_points(self) -> list[Point]:
        """AdamW's best point of cpu_lr with 3 seeds (or, with `baseline_grid`, cpu_lr's AdamW grid
        under the grid seeds), run here into `baselines/`."""
        p = self.protocol
        values = [lr_value(p.baseline_lr, k) for k in (range(-3, 4) if self.baseline_grid else [0])]
        grid = plan(spec_of(f"{self.name}_baselines", self.dir / "baselines", p, REFERENCE, ADAMW_YAML, {"lr": values}))
        seeds = p.grid_seeds if self.baseline_grid else p.grid_seeds + p.best_seeds
        return grid + [with_seed(point, s) for s in seeds for point in grid]

    def reusable(self) -> dict[str, Path]:
        """Done runs of this CPU, threads and packages (lm_opt.study.reuse) in the committed sweeps, the
        cards and their baselines, this card's included: a point of the same config takes a copy."""
        return known_runs(COMMITTED, threads_per_job(self.jobs), self.dir.parent)

    def run(self, points: list[Point], sweep: str | None = None) -> None:
        """Write and run the points not done yet (a copy of a same-config record where one exists)."""
        todo = prepare(points, {"name": sweep or self.name}, self.reusable(), WhenDone(self.commit))
        print(f"card {self.name}: {len(points) - len(todo)} of {len(points)} points done already, {len(todo)} to run",
              flush=True)
        if todo:
            for name, problem in execute(todo, self.jobs, WhenDone(self.commit)).items():
                if problem:
                    self.problems[name] = problem

    def lr_grid(self) -> list[Point]:
        """The seed-0 grid, grown until bracketed (`grow`)."""
        points, self.ks = self.grow(self.grid, self.ks, self.center)
        return points

    def grow(self, points_of: Callable[[list[int]], list[Point]], ks: list[int], center: float,
             sweep: str | None = None) -> tuple[list[Point], list[int]]:
        """Run the grid `points_of(ks)` (lr `center` x 10^(k/4)), growing it one quarter-decade at a
        time until its best point is bracketed and its stable range ends inside it
        (card_plan.extension); returns its points and steps."""
        grown = {-1: 0, 1: 0}
        while True:
            points = points_of(ks)
            self.run(self.checked(points), sweep)
            results = {k: {"status": s.status, "final_val_loss": s.final_val_loss}
                       for k, s in zip(ks, (read_summary(p.run_dir) for p in points))}
            k, why = extension(results, self.protocol.margin)
            if k is None:
                self.log.append(why)
                return points, ks
            side = -1 if k < ks[0] else 1
            if grown[side] >= self.protocol.max_extend:
                self.log.append(f"not bracketed: {why}, but the grid grew {grown[side]} quarter-decades on that side "
                                f"already (the protocol's limit)")
                return points, ks
            grown[side] += 1
            self.log.append(f"{why}: added lr {lr_value(center, k):.3g}")
            ks = sorted([*ks, k])

    def run_all(self) -> dict:
        """Every run of the card, then its timing; returns what the writing needs."""
        grid = self.checked(self.grid())  # a bad optimizer fails here, before anything is written
        usable = self.baselines()
        base_points = [] if usable["cpu_lr"][0] else self.checked(self.baseline_points())
        check_one_cpu_kind(grid)
        if base_points:
            check_one_cpu_kind(base_points)
            self.run(base_points, f"{self.name}_baselines")
            if self.baseline_grid:
                self.run(seed_points(base_points[:7], self.protocol.best_seeds), f"{self.name}_baselines")
        grid = self.lr_grid()
        best = next((p for p in grid if p.name == best_name(grid)), None)
        if best is None:
            self.log.append("no finished grid point: no seeds, beta1 line or timing")
            return {"usable": usable, "grid": grid, "best": None}
        self.run(self.checked([with_seed(p, s) for s in self.protocol.grid_seeds for p in grid]
                         + [with_seed(best, s) for s in self.protocol.best_seeds]))
        if self.has_beta1 and self.protocol.beta1:
            line = self.checked(self.beta1_points(best.values["lr"]))
            self.run(line)
            # The best finished value, as for the grid: a value the optimizer cannot run (it crashes,
            # reported under "Not finished") does not hold back the seeds of the others.
            best_beta1 = next((p for p in line if p.name == best_name(line)), None)
            if best_beta1 is not None:
                self.run(self.checked([with_seed(best_beta1, s) for s in self.protocol.beta1_seeds]))
        timing = self.timing(best)
        horizons = run_horizons(self) if self.horizons else []
        return {"usable": usable, "grid": grid, "best": best, "timing": timing, "horizons": horizons}

    def timing(self, best: Point) -> dict:
        """Step time of the best point's optimizer against AdamW's, side by side in this process
        (lm_opt.study.step_time's alternating rounds); cached in timing.json."""
        cached = self.dir / "timing.json"
        key = {"optimizer": best.optimizer_yaml, "threads": threads_per_job(self.jobs), "precision": self.precision,
               "steps": self.protocol.timing_steps, "rounds": self.protocol.timing_rounds}
        previous = json.loads(cached.read_text()) if cached.is_file() else {}
        if previous.get("key") == key:
            return previous
        result = {"key": key, **time_steps(best, self.protocol, self.precision, key["threads"])}
        cached.write_text(json.dumps(result, indent=1))
        return result


def requested_precision(protocol: Protocol) -> str:
    """`trainer.precision` as the protocol's overrides or its last base config set it."""
    precision = "auto"
    for base in protocol.base:
        precision = ((read_yaml(base) or {}).get("trainer") or {}).get("precision", precision)
    return protocol.overrides.get("trainer.precision", precision)


def best_name(grid: list[Point]) -> str | None:
    finished = [(s.final_val_loss, p.name) for p in grid
                if (s := read_summary(p.run_dir)).status == "finished" and s.final_val_loss is not None]
    return min(finished)[1] if finished else None


def optimizer_callback(source: dict, label: str):
    """A fresh OptimizerCallback of an optimizer YAML's content."""
    from lm_opt.callbacks import OptimizerCallback

    return OptimizerCallback(**callback_init_args(json.loads(json.dumps(source)), label))


def run_shape(config: dict) -> dict:
    """What a step costs besides its optimizer, from a resolved config: the preset, batch and length."""
    return {"preset": config["model"]["preset"], "batch_size": config["data"]["batch_size"],
            "seq_len": config["data"]["seq_len"]}


def time_steps(best: Point, protocol: Protocol, precision: str, threads: int) -> dict:
    """Median seconds per step of AdamW and of the card's optimizer (the best point's YAML), in
    alternating rounds on the best point's preset, batch and sequence length, random tokens; their
    ratio is the median of the rounds' ratios (a shared machine's drift cancels within a round)."""
    import torch

    from lm_opt.study.step_time import medians, side_by_side

    yamls = {REFERENCE: read_yaml(ADAMW_YAML), "card": best.optimizer_yaml}
    setups = {label: partial(optimizer_callback, source, label) for label, source in yamls.items()}
    shape = run_shape(best.resolved)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"timing {protocol.timing_rounds} alternating rounds of {protocol.timing_steps} steps, AdamW and the card's "
          f"optimizer, {threads} thread(s), {precision}", flush=True)
    try:
        seconds = side_by_side(setups, precision=precision, steps=protocol.timing_steps,
                               warmup=protocol.timing_warmup, rounds=protocol.timing_rounds, **shape)
    finally:
        torch.set_num_threads(previous)
    ratio = statistics.median(card / adamw for card, adamw in zip(seconds["card"], seconds[REFERENCE]))
    return {"step_s": medians(seconds), "rounds_s": seconds, "ratio": ratio, "threads": threads, **shape}


def new_card(config: str, name: str | None, out_root: str | Path, jobs: int, protocol: Protocol | None = None,
             baseline_grid: bool = False, commit: bool = False, horizons: list[int] = (),
             length_keys: list[str] = ()) -> Card:
    """The card of the command's arguments, checked: a SpecError names the one that is wrong."""
    if jobs < 1:
        raise SpecError(f"--jobs must be >= 1, got {jobs}")
    if horizons:
        ladder_overrides((protocol or Protocol()).ladder_spec)  # a missing or broken ladder spec fails here
    name = name or Path(config).stem
    if not re.fullmatch(r"[\w.+-]+", name):
        raise SpecError(f"--name must be a word like 'adamw' (it names the card's folder), got {name!r}")
    if length_keys and not horizons:
        raise SpecError("--length-keys sets optimizer hyperparameters to each length of --horizons; give --horizons")
    return Card(config, name, Path(out_root), protocol or Protocol(), jobs, baseline_grid, commit, horizons,
                length_keys)


def run_card(config: str, name: str | None = None, out_root: str | Path = "logs/cards", jobs: int = 1,
             protocol: Protocol | None = None, baseline_grid: bool = False, commit: bool = False,
             horizons: list[int] = (), length_keys: list[str] = ()) -> Card:
    """Run (or resume) the card's points and write its card.md; returns the card."""
    from lm_opt.study.card_write import write_card

    start = time.time()
    card = new_card(config, name, out_root, jobs, protocol, baseline_grid, commit, horizons, length_keys)
    ran = card.run_all()
    for point, problem in card.problems.items():
        print(f"CRASHED {point}: {problem}; rerun the card to retry", flush=True)
    write_card(card, ran, time.time() - start)
    if commit:
        commit_files(card.dir, f"card {name}: card.md, results.csv and figures")
    return card


def main(argv: list[str] | None = None) -> None:
    """Exit codes: 2 for bad input (nothing ran), 1 if a point crashed, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m lm_opt card", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="an optimizer YAML with one OptimizerCallback, e.g. configs/optim/lion.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once")
    parser.add_argument("--name", help="the card's name and folder (default: the YAML's file name)")
    parser.add_argument("--out", default="logs/cards", help="where the card's folder goes")
    parser.add_argument("--baseline-grid", action="store_true",
                        help="where the baselines are rerun: AdamW's whole cpu_lr grid under 2 seeds too (14 runs "
                             "more), so that the stable width is compared on this CPU kind")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each point's record (not its checkpoints) as soon as it is done, and the card")
    parser.add_argument("--horizons", type=horizon_list, default=[],
                        help="lengths in steps, e.g. 200,800,3200: the optimizer retuned at each length at the AdamW "
                             "ladder's model, 3 seeds at each best, read as a speedup (lm_opt.study.card_horizons)")
    parser.add_argument("--length-keys", type=lambda text: text.split(","), default=[],
                        help="with --horizons: the optimizer's init_args counted in steps of the run (AdEMAMix's "
                             "t_alpha_beta3), set to each length's steps")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the YAML, print the plan, the baselines it would read or rerun and an estimate "
                             "of the wall clock here; train nothing, write nothing")
    args = parser.parse_args(argv)
    with command_endings("card"):
        if args.dry_run:
            from lm_opt.study.card_dry_run import dry_run

            return dry_run(new_card(args.config, args.name, args.out, args.jobs, baseline_grid=args.baseline_grid))
        card = run_card(args.config, args.name, args.out, args.jobs, baseline_grid=args.baseline_grid,
                        commit=args.commit, horizons=args.horizons, length_keys=args.length_keys)
    if card.problems:
        raise SystemExit(1)
