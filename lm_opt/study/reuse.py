"""A sweep point that another sweep already ran takes that run's record instead of running again.

A CPU run is deterministic: the same resolved config, precision, packages, CPU model, CPU arithmetic
and thread count give the same record to the last digit (`lm_opt recheck` checks it). So a CPU point
whose resolved config, with the precision this machine resolves it to (`trainer.precision: auto`),
equals a done run's in a sibling sweep folder (all but its logger and the checkpoint it resumed
from), recorded with this interpreter's packages, this CPU model and kind (lm_opt.precision.same_kind)
and the threads the point would get, is done already: its folder gets a copy of that run's files
(not its checkpoints) and its point record says `copied_from`.
GPU runs are not bitwise deterministic and always run.
"""

import json
import shutil
from pathlib import Path

from lm_opt.precision import cpu_arithmetic, resolve, same_kind
from lm_opt.provenance import cpu_name, installed_version, package_versions
from lm_opt.record import POINT_FILES, sweep_runs
from lm_opt.run_lock import LOCK_FILES
from lm_opt.study.sweep_plan import DONE, Point


DIAGNOSTICS = ("eff_lr", "update_size")
"""Config sections of callbacks that only read the run (lm_opt.callbacks.effective_lr, update_size)."""


def run_key(config: dict, precision: str | None = None) -> str:
    """The resolved config as JSON with the precision it ran in (or, for a point not yet run, the one
    this machine resolves it to), less its logger (where and how it logs), its diagnostics (what they
    log; they never touch the weights) and the checkpoint it resumed from (a resumed run continues bit
    for bit: tests/test_preemption.py)."""
    config = json.loads(json.dumps(config))
    for key in ("ckpt_path", *DIAGNOSTICS):
        config.pop(key, None)
    trainer = config.setdefault("trainer", {})
    trainer.pop("logger", None)
    trainer["precision"] = precision or resolve(trainer.get("precision"), trainer.get("accelerator", "auto")).precision
    return json.dumps(config, sort_keys=True)


def done_runs(sweeps_root: Path, threads: int) -> dict[str, Path]:
    """run_key -> folder, for each done CPU run under `sweeps_root/<sweep>/<point>` made on this CPU
    model and kind, with these packages (its optimizer's package's version included) and `threads`
    threads."""
    packages, cpu, arithmetic = package_versions(), cpu_name(), cpu_arithmetic()
    runs = {}
    for run_dir, summary in sweep_runs(sweeps_root):
        device, provenance = summary.device, summary.provenance or {}
        foreign = provenance.get("optimizer_packages") or {}
        if (summary.status in DONE and summary.config and provenance.get("packages") == packages
                and all(installed_version(d) == v for d, v in foreign.items())
                and device.get("type") == "cpu" and device.get("name") == cpu and device.get("threads") == threads
                and same_kind(device.get("arithmetic"), arithmetic)):
            runs.setdefault(run_key(summary.config, device.get("precision")), run_dir)
    return runs


def known_runs(sweeps_root: Path, threads: int, cards_root: Path | None = None) -> dict[str, Path]:
    """done_runs of the sweeps under `sweeps_root` (logs/sweeps), then of the cards under
    `cards_root` (default: `logs/cards` beside it) and of their baselines: the first of each config."""
    cards_root = sweeps_root.parent / "cards" if cards_root is None else cards_root
    runs: dict[str, Path] = {}
    for root in [sweeps_root, cards_root, *sorted(cards_root.glob("*"))]:
        for key, source in (done_runs(root, threads) if root.is_dir() else {}).items():
            runs.setdefault(key, source)
    return runs


def copy_record(source: Path, point: Point) -> None:
    """`source`'s files (not its checkpoints, nor its lock) into the point's folder, which has no run of its own."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in POINT_FILES + LOCK_FILES:
            shutil.copy2(item, point.run_dir / item.name)
