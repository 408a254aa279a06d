"""`python -m lm_opt sweep SPEC [--jobs N] [--slurm] [--dry-run]`: a grid of ordinary `fit` runs.

A spec (YAML) names `base` configs, `optimizers` (label -> optimizer YAML and its own grid),
a shared `grid` crossed with every optimizer's grid, and `overrides`. Each point is one
`python -m lm_opt fit` run in its own folder `out_dir/<point name>`, which holds the point's
optimizer YAML (a copy of the optimizer's with the swept values), `command.sh` (run it to
run, rerun or resume the point alone; local runs and Slurm tasks both run exactly it) and
`point.json` (the swept values, for `report`). Every point's config is parsed before
anything launches. A rerun skips finished and diverged points and resumes the others.

Grid keys are dotted config keys (`model.qk_norm`, `trainer.max_steps`), or keys inside the
optimizer YAML's OptimizerCallback: `optimizer.init_args.eps`, `routes.1.optimizer.init_args.lr`,
and the shorthands `lr` and `beta1` (of the optimizer, or of its first route). A grid whose
values are mappings is a paired axis: each value sets several keys together, e.g.
`{model.qk_norm: false, model.z_loss: 0.0}`.
"""

import argparse
import copy
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPEC_KEYS = ("name", "out_dir", "base", "optimizers", "grid", "overrides")
OPTIMIZER_KEYS = ("config", "grid")
DONE = ("finished", "diverged")
OPTIMIZER_HEADS = ("optimizer", "routes")


class SpecError(ValueError):
    """A sweep spec that cannot run; raised before any point launches."""


@dataclass
class Axis:
    name: str
    """Short label in point names, reports and plots (`lr`, `beta1`, `qk_norm`)."""
    values: list
    """Scalars for one key; mappings of key -> value for a paired axis."""
    key: str | None
    """The dotted key this axis sets; None for a paired axis."""


@dataclass
class Point:
    name: str
    optimizer: str
    values: dict[str, Any]
    """Axis name -> value, the optimizer's axes first."""
    shared: list[str]
    """The axes that come from the shared grid."""
    run_dir: Path
    optimizer_yaml: dict
    """The optimizer YAML with this point's values."""
    base: list[str]
    overrides: list[str]
    """`--key value` arguments after the configs."""
    resolved: dict = field(default_factory=dict)

    def fit_args(self, optimizer_yaml: Path | None = None) -> list[str]:
        """The `fit` arguments; the optimizer YAML is the point's own unless given."""
        configs = [*self.base, str(optimizer_yaml or self.run_dir / OPTIMIZER_YAML)]
        return ["fit", *(a for c in configs for a in ("--config", c)), *self.overrides,
                "--trainer.logger.init_args.save_dir", str(self.run_dir.parent),
                "--trainer.logger.init_args.name", self.name]


OPTIMIZER_YAML = "optimizer.yaml"


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be a mapping, got {value!r}")
    return value


def _check_keys(value: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; expected some of {list(allowed)}")


def _existing_file(path: Any, where: str) -> str:
    if not isinstance(path, str) or not Path(path).is_file():
        raise SpecError(f"{where}: file {path!r} does not exist (paths are relative to the working directory)")
    return path


def load_spec(path: str | Path) -> dict:
    """Read and check a spec; every error names the key it is about."""
    if not Path(path).is_file():
        raise SpecError(f"sweep spec {str(path)!r} does not exist")
    spec = _mapping(yaml.safe_load(Path(path).read_text()), f"sweep spec {path}")
    _check_keys(spec, SPEC_KEYS, f"sweep spec {path}")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[\w.+-]+", name):
        raise SpecError(f"sweep spec {path}: `name` must be a word like 'lr_150m', got {name!r}")
    base = spec.get("base") or []
    base = [base] if isinstance(base, str) else base
    spec["base"] = [_existing_file(b, f"base[{i}]") for i, b in enumerate(base)]
    spec["out_dir"] = Path(spec.get("out_dir") or Path("logs") / "sweeps" / name)
    spec["grid"] = _check_grid(spec.get("grid") or {}, "grid")
    spec["overrides"] = _mapping(spec.get("overrides") or {}, "overrides")
    optimizers = _mapping(spec.get("optimizers"), "optimizers")
    if not optimizers:
        raise SpecError("optimizers: needs at least one optimizer")
    for label, entry in optimizers.items():
        where = f"optimizers.{label}"
        if not re.fullmatch(r"[\w.+-]+", str(label)):
            raise SpecError(f"{where}: an optimizer label must be a word (it starts folder names)")
        _check_keys(_mapping(entry, where), OPTIMIZER_KEYS, where)
        _existing_file(entry.get("config"), f"{where}.config")
        entry["grid"] = _check_grid(entry.get("grid") or {}, f"{where}.grid")
    return spec


def _check_grid(grid: Any, where: str) -> dict:
    for key, values in _mapping(grid, where).items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}.{key}: needs a non-empty list of values, got {values!r}")
        kinds = {isinstance(v, dict) for v in values}
        if kinds == {True} and not all(values):
            raise SpecError(f"{where}.{key}: a paired axis needs non-empty mappings of key -> value")
        if len(kinds) > 1:
            raise SpecError(f"{where}.{key}: mixes mappings (a paired axis) and plain values")
    return grid


def short_name(key: str) -> str:
    """`lr` for `routes.1.optimizer.init_args.lr`, `qk_norm` for `model.qk_norm`, `betas0` for `...betas.0`."""
    parts = key.split(".")
    return parts[-2] + parts[-1] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def axes_of(grid: dict) -> list[Axis]:
    return [Axis(key, values, None) if isinstance(values[0], dict) else Axis(short_name(key), values, key)
            for key, values in grid.items()]


def format_value(value: Any) -> str:
    """Compact and unambiguous: `3.16e-04`, `0.9`, `true`."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:g}" if 1e-2 <= abs(value) < 1e3 else f"{value:.2e}"
    if isinstance(value, dict):
        return "_".join(fragment(short_name(k), v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    return re.sub(r"[^\w.+-]", "-", str(value))


def fragment(name: str, value: Any) -> str:
    """An axis' part of a point name: `lr3.16e-04`, `beta1-0.9`, `qk_norm-false`."""
    text = format_value(value)
    if isinstance(value, dict):
        return text
    glue = "" if name[-1].isalpha() and text[:1].isdigit() else "-"
    return f"{name}{glue}{text}"


def optimizer_path(key: str, init_args: dict, where: str) -> list | None:
    """Where `key` lives inside the OptimizerCallback's init_args; None for an ordinary CLI key."""
    first = ["optimizer"] if init_args.get("optimizer") is not None else ["routes", 0, "optimizer"]
    if key == "lr":
        return [*first, "init_args", "lr"]
    if key == "beta1":
        args = get_path(init_args, [*first, "init_args"], where)
        if "betas" in args:
            return [*first, "init_args", "betas", 0]
        if "momentum" in args:
            return [*first, "init_args", "momentum"]
        raise SpecError(f"{where}: `beta1` needs `betas` or `momentum` in the optimizer's init_args, "
                        f"found {sorted(args)}")
    if key.split(".")[0] in OPTIMIZER_HEADS:
        return [int(p) if p.isdigit() else p for p in key.split(".")]
    return None


def get_path(tree: Any, path: list, where: str) -> Any:
    for i, part in enumerate(path):
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            raise SpecError(f"{where}: the optimizer YAML has no {'.'.join(map(str, path[:i + 1]))!r}") from None
    return tree


def set_path(tree: Any, path: list, value: Any, where: str) -> None:
    parent = get_path(tree, path[:-1], where)
    if isinstance(parent, list) and not (isinstance(path[-1], int) and path[-1] < len(parent)):
        raise SpecError(f"{where}: index {path[-1]} is out of range of {parent!r}")
    if not isinstance(parent, (list, dict)):
        raise SpecError(f"{where}: {'.'.join(map(str, path[:-1]))!r} is not a mapping or list")
    parent[path[-1]] = copy.deepcopy(value)


def callback_init_args(optimizer_yaml: dict, config: str) -> dict:
    """The init_args of the one OptimizerCallback in an optimizer YAML's trainer.callbacks."""
    callbacks = (optimizer_yaml.get("trainer") or {}).get("callbacks") or []
    found = [c for c in callbacks if isinstance(c, dict) and str(c.get("class_path", "")).endswith("OptimizerCallback")]
    if len(found) != 1:
        raise SpecError(f"{config}: needs exactly one OptimizerCallback in trainer.callbacks, found {len(found)}")
    return found[0].setdefault("init_args", {})


def cli_value(value: Any) -> str:
    """A value as jsonargparse reads it back (YAML flow style: `1.0e-05`, `true`, `[0.9, 0.95]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()


def plan(spec: dict) -> list[Point]:
    """Every point of the sweep, in order: optimizers, then the shared grid, then each optimizer's grid."""
    points, shared = [], axes_of(spec["grid"])
    for label, entry in spec["optimizers"].items():
        axes = axes_of(entry["grid"]) + shared
        short = [a.name for a in axes]  # two keys that shorten alike keep their full names
        names = [a.key if a.key and short.count(a.name) > 1 else a.name for a in axes]
        source = yaml.safe_load(Path(entry["config"]).read_text())
        for shared_combo in itertools.product(*(a.values for a in shared)):
            for own_combo in itertools.product(*(a.values for a in axes[:len(axes) - len(shared)])):
                combo = own_combo + shared_combo
                settings = dict(spec["overrides"])
                for axis, value in zip(axes, combo):
                    settings.update(value if axis.key is None else {axis.key: value})
                name = "_".join([label, *(fragment(n, v) for n, v in zip(names, combo))])
                optimizer_yaml, overrides = split_settings(name, label, settings, source, entry["config"])
                points.append(Point(name, label, dict(zip(names, combo)), names[len(axes) - len(shared):],
                                    spec["out_dir"] / name, optimizer_yaml, spec["base"], overrides))
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            raise SpecError(f"points {seen[p.name].values} and {p.values} of {p.optimizer!r} share the name "
                            f"{p.name!r}; use values that differ in 3 significant digits")
        seen[p.name] = p
    return points


def split_settings(name: str, label: str, settings: dict, source: dict, config: str) -> tuple[dict, list[str]]:
    """Keys of the optimizer go into a copy of its YAML, the others onto the command line."""
    optimizer_yaml, overrides = copy.deepcopy(source), []
    init_args = callback_init_args(optimizer_yaml, config)
    for key, value in settings.items():
        where = f"point {name}: key {key!r} (optimizer {label!r}, {config})"
        path = optimizer_path(key, init_args, where)
        if path is None:
            overrides += [f"--{key}", cli_value(value)]
        else:
            set_path(init_args, path, value, where)
    return optimizer_yaml, overrides


def validate(point: Point) -> dict:
    """Parse the point's `fit` command as the CLI would (`--print_config`) and build its optimizer
    on a dummy tensor, so that a bad key or value fails here, naming the point."""
    from lm_opt.callbacks import OptimizerCallback
    from lm_opt.cli import LMOptCLI

    with tempfile.TemporaryDirectory() as tmp:
        optimizer_yaml = Path(tmp) / OPTIMIZER_YAML
        optimizer_yaml.write_text(yaml.safe_dump(point.optimizer_yaml, sort_keys=False))
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "LightningCLI's args parameter")
                LMOptCLI(args=[*point.fit_args(optimizer_yaml), "--print_config"])
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                lines = err.getvalue().strip().splitlines()
                start = next((i for i, line in enumerate(lines) if line.startswith("error:")), len(lines) - 3)
                message = " ".join(line.strip() for line in lines[start:])
                raise SpecError(f"point {point.name}: its config does not parse: {message}") from None
        except Exception as exc:
            raise SpecError(f"point {point.name}: {type(exc).__name__}: {exc}") from None
    resolved = yaml.safe_load(out.getvalue())
    try:
        OptimizerCallback(**callback_init_args(resolved, point.name))
    except (ValueError, TypeError) as exc:
        raise SpecError(f"point {point.name}: its optimizer cannot be built: {exc}") from None
    point.resolved = resolved
    return resolved


def point_state(run_dir: Path) -> str:
    """`done` (finished or diverged), `resume` (from last.ckpt), `retry` (ended unfinished without a
    checkpoint) or `start`."""
    status = read_status(run_dir)
    if status in DONE:
        return "done"
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return "resume"
    return "retry" if status else "start"


def read_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def read_status(run_dir: Path) -> str | None:
    return read_summary(run_dir).get("status")


COMMAND_TEMPLATE = """#!/usr/bin/env bash
# Point {name} of sweep {sweep} (`python -m lm_opt sweep`). Run, rerun or resume it alone:
#   bash {script}
# A finished or diverged point is left alone; an interrupted one resumes from last.ckpt.
set -e
cd {cwd}
RUN={run_dir}
if [ -f "$RUN/summary.json" ] && grep -Eq '"status": "(finished|diverged)"' "$RUN/summary.json"; then
  echo "$RUN is done: $(grep -Eo '"status": "[a-z]+"' "$RUN/summary.json")"
  exit 0
fi
RESUME=()
if [ -f "$RUN/checkpoints/last.ckpt" ]; then RESUME=(--ckpt_path last); fi
exec {command} "${{RESUME[@]}}"
"""


def shell_lines(command: list[str]) -> str:
    """The command quoted for bash, one `--key value` per line."""
    lines: list[list[str]] = [[]]
    for arg in command:
        if arg.startswith("--") and lines[-1]:
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n  ".join(" ".join(line) for line in lines)


def command_of(point: Point) -> list[str]:
    return [sys.executable, "-m", "lm_opt", *point.fit_args()]


def recorded_command(run_dir: Path) -> list[str] | None:
    try:
        return json.loads((run_dir / "point.json").read_text())["command"]
    except (OSError, ValueError, KeyError):
        return None


def write_point(point: Point, sweep: str) -> Path:
    """The point's folder: its optimizer YAML, `command.sh` and `point.json`."""
    point.run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Optimizer of point {point.name} of sweep {sweep}, written by `python -m lm_opt sweep`.\n"
    (point.run_dir / OPTIMIZER_YAML).write_text(header + yaml.safe_dump(point.optimizer_yaml, sort_keys=False))
    command = command_of(point)
    script = point.run_dir / "command.sh"
    script.write_text(COMMAND_TEMPLATE.format(
        name=point.name, sweep=sweep, script=shlex.quote(str(script)), cwd=shlex.quote(os.getcwd()),
        run_dir=shlex.quote(str(point.run_dir)), command=shell_lines(command)))
    script.chmod(0o755)
    record = {"sweep": sweep, "name": point.name, "optimizer": point.optimizer, "values": point.values,
              "shared": point.shared, "command": command}
    (point.run_dir / "point.json").write_text(json.dumps(record, indent=2))
    return script


def write_slurm(points: list[Point], spec: dict) -> Path:
    """An sbatch array script, one task per point, each running the point's command.sh."""
    out_dir = spec["out_dir"].resolve()
    trainer = points[0].resolved.get("trainer", {})
    gpus = trainer.get("devices") if trainer.get("accelerator") in ("gpu", "cuda") else None
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name={spec['name']}", f"#SBATCH --array=0-{len(points) - 1}",
             f"#SBATCH --output={out_dir}/slurm/%A_%a.out"]
    if isinstance(gpus, int):
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    lines += ["# Add your cluster's --partition, --time, --cpus-per-task above. Submit with:",
              f"#   sbatch {out_dir}/sweep.sbatch",
              "# Each task runs one point's command.sh, as `python -m lm_opt sweep` does locally: finished",
              "# and diverged points are skipped, interrupted ones resume. Then:",
              f"#   python -m lm_opt report {out_dir}",
              "POINTS=("] + [f"  {shlex.quote(str(p.run_dir.resolve()))}" for p in points] + [
              ")", 'RUN=${POINTS[$SLURM_ARRAY_TASK_ID]}', 'bash "$RUN/command.sh" >>"$RUN/fit.log" 2>&1', ""]
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    script = out_dir / "sweep.sbatch"
    script.write_text("\n".join(lines))
    return script


def gpu_slots() -> list[str]:
    """The CUDA devices to give one each to concurrent points; none on a CPU machine."""
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]


def outcome(point: Point, returncode: int) -> str | None:
    """None when the point ended as a result (finished or diverged), else what went wrong."""
    summary = read_summary(point.run_dir)
    status = summary.get("status")
    if returncode == 0 and status in DONE:
        return None
    reason = summary.get("error") or (f"status {status}" if status else "no summary.json")
    return f"exit code {returncode}: {reason}"


def launch(point: Point, slot: str | None, env: dict) -> subprocess.Popen:
    """Start the point's command.sh, its output appended to fit.log, on GPU `slot` if any."""
    env = dict(env, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
    with open(point.run_dir / "fit.log", "ab") as log:
        return subprocess.Popen(["bash", str(point.run_dir / "command.sh")], stdout=log, stderr=subprocess.STDOUT,
                                env=env)


def execute(points: list[Point], jobs: int) -> dict[str, str | None]:
    """Run the points' command.sh, `jobs` at a time (one GPU each where there are GPUs)."""
    gpus = gpu_slots()
    slots: list[str | None] = gpus[:jobs] if gpus else [None] * jobs
    if gpus and jobs > len(gpus):
        print(f"--jobs {jobs} > {len(gpus)} GPUs: running {len(gpus)} at a time, one per GPU")
    env = dict(os.environ)
    if not gpus and jobs > 1:  # share the CPU cores instead of oversubscribing them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    pending, running, results = list(enumerate(points, 1)), {}, {}
    try:
        while pending or running:
            while pending and slots:
                (i, point), slot = pending.pop(0), slots.pop(0)
                how = {"resume": " (resuming from last.ckpt)", "retry": " (again: its last attempt did not finish)"}
                print(f"[{i}/{len(points)}] start {point.name}{how.get(point_state(point.run_dir), '')}"
                      + (f" on GPU {slot}" if slot is not None else ""), flush=True)
                running[launch(point, slot, env)] = (i, point, slot, time.time())
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                i, point, slot, start = running.pop(proc)
                slots.append(slot)
                results[point.name] = problem = outcome(point, proc.returncode)
                status = read_status(point.run_dir) if problem is None else f"CRASHED ({problem})"
                print(f"[{i}/{len(points)}] {point.name}: {status} after {time.time() - start:.0f} s", flush=True)
    except KeyboardInterrupt:
        # Ctrl-C reached the points too (one process group): let them write `interrupted` summaries.
        for proc in running:
            proc.wait()
        raise
    return results


def run_sweep(spec_path: str, jobs: int = 1, slurm: bool = False, dry_run: bool = False) -> dict[str, str | None]:
    """Plan, validate, then run (or write the Slurm script for) a sweep; returns point -> problem or None."""
    if jobs < 1:
        raise SpecError(f"--jobs must be >= 1, got {jobs}")
    spec = load_spec(spec_path)
    points = plan(spec)
    print(f"sweep {spec['name']}: {len(points)} points in {spec['out_dir']}; checking every point's config", flush=True)
    for point in points:
        validate(point)
    states = {p.name: point_state(p.run_dir) for p in points}
    if dry_run:
        for p in points:
            print(f"{states[p.name]:>6}  {p.name}\n        python -m lm_opt {shlex.join(p.fit_args())}")
        return {}
    spec["out_dir"].mkdir(parents=True, exist_ok=True)
    (spec["out_dir"] / "sweep.yaml").write_text(Path(spec_path).read_text())
    for point in points:  # a done point keeps the record of what it ran
        if states[point.name] != "done" or not (point.run_dir / "command.sh").is_file():
            write_point(point, spec["name"])
        elif recorded_command(point.run_dir) != command_of(point):
            print(f"warning: {point.name} is done but ran another command (see its command.sh); "
                  f"delete {point.run_dir} to rerun it with this spec")
    if slurm:
        print(f"wrote {write_slurm(points, spec)} ({len(points)} tasks); submit it with sbatch")
        return {}
    todo = [p for p in points if states[p.name] != "done"]
    print(f"{len(points) - len(todo)} points already done, {len(todo)} to run", flush=True)
    results = execute(todo, jobs) if todo else {}
    for name, problem in results.items():
        if problem:
            print(f"CRASHED {name}: {problem}; log: {spec['out_dir'] / name / 'fit.log'}; rerun the sweep to retry")
    from lm_opt.report import write_report

    write_report(spec["out_dir"])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_opt sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="sweep spec YAML, e.g. configs/sweeps/tiny_cpu.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (one per GPU where there are GPUs)")
    parser.add_argument("--slurm", action="store_true",
                        help="write out_dir/sweep.sbatch (an array job) instead of running")
    parser.add_argument("--dry-run", action="store_true", help="check the spec and print the points and commands")
    args = parser.parse_args(argv)
    try:
        results = run_sweep(args.spec, args.jobs, args.slurm, args.dry_run)
    except SpecError as err:
        print(f"lm_opt sweep: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("sweep interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    if any(results.values()):
        raise SystemExit(1)
