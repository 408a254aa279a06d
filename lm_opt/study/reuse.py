"""A sweep point that another sweep already ran takes that run's record instead of running again.

A CPU run is deterministic: the same resolved config, packages, CPU model and thread count give the
same record to the last digit (`lm_opt recheck` checks it). So a CPU point whose resolved config
equals a done run's in a sibling sweep folder (all but its logger and the checkpoint it resumed
from), recorded with this interpreter's packages, this CPU and the threads the point would get, is
done already: its folder gets a copy of that run's files (not its checkpoints) and its
`point.json` says `copied_from`.
GPU runs are not bitwise deterministic and always run.
"""

import json
import shutil
from pathlib import Path

from lm_opt.provenance import cpu_name, package_versions
from lm_opt.study.sweep_plan import DONE, OPTIMIZER_YAML, Point


def run_key(config: dict) -> str:
    """The resolved config as JSON, less its logger (where and how it logs) and the checkpoint it
    resumed from (a resumed run continues bit for bit: tests/test_preemption.py)."""
    config = json.loads(json.dumps(config))
    config.pop("ckpt_path", None)
    (config.get("trainer") or {}).pop("logger", None)
    return json.dumps(config, sort_keys=True)


def done_runs(sweeps_root: Path, threads: int) -> dict[str, Path]:
    """run_key -> folder, for each done CPU run under `sweeps_root/<sweep>/<point>` made on this CPU,
    with these packages and `threads` threads."""
    packages, cpu = package_versions(), cpu_name()
    runs = {}
    for summary_file in sorted(sweeps_root.glob("*/*/summary.json")):
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, ValueError):
            continue
        provenance = summary.get("provenance") or {}
        device = provenance.get("device") or {}
        if (summary.get("status") in DONE and summary.get("config") and provenance.get("packages") == packages
                and device.get("type") == "cpu" and device.get("name") == cpu and device.get("threads") == threads):
            runs.setdefault(run_key(summary["config"]), summary_file.parent)
    return runs


def copy_record(source: Path, point: Point) -> None:
    """`source`'s files (not its checkpoints) into the point's folder, which has no run of its own."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name not in ("point.json", "command.sh", OPTIMIZER_YAML):
            shutil.copy2(item, point.run_dir / item.name)
