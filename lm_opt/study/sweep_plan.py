"""A sweep spec read, checked and expanded into its points, before anything runs.

A spec (YAML) names `base` configs, `optimizers` (label -> optimizer YAML, its own grid and its own
fixed `overrides`, e.g. SOAP's `optimizer.init_args.max_precond_dim`),
a shared `grid` crossed with every optimizer's grid, `seeds` to repeat each line's best point
with once its grid is done, `grid_seeds` to repeat the whole grid with (where a measure over
the grid, such as the width of the stable lr range, needs its own seed noise; `grid_seeds_cover:
stable` repeats only what that width needs), and `overrides`. Each point gets a copy
of its optimizer's YAML with the swept values set in it, and the remaining keys as `--key
value` arguments; `validate` parses a point's whole `fit` command before launch, so that a
bad key or value fails naming its point rather than hours into the sweep.

Grid keys are dotted config keys (`model.qk_norm`, `trainer.max_steps`), or keys inside the
optimizer YAML's OptimizerCallback: `optimizer.init_args.eps`, `routes.1.optimizer.init_args.lr`,
and the shorthands `lr` and `beta1` (of the optimizer, or of its first route). A grid whose
values are mappings is a paired axis: each value sets several keys together, e.g.
`{model.qk_norm: false, model.z_loss: 0.0}`; one whose keys all take the same value (`lr: [{routes.0.
optimizer.init_args.lr: 1.0e-3, routes.1.optimizer.init_args.lr: 1.0e-3}, ...]`) is named by it.

The length of training is swept in the shared grid (`trainer.max_steps: [50, 200, 800]`) or set in
an optimizer's own overrides (one label per length, each with its own lr grid, where the spec's
overrides give the reference below): either way each length is a line of its own, compared at the
end of its own schedule, and what depends on the length is scaled by it (`scale_to_length`): the
warmup is a fraction of the run, and the validation and checkpoint intervals, given in the spec's
overrides at its own `trainer.max_steps`, are scaled to each point's.
"""

import copy
import io
import itertools
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm_opt.errors import UserError, invalid_yaml
from lm_opt.record import OPTIMIZER_YAML
from lm_opt.user_yaml import read_yaml

SPEC_KEYS = ("name", "out_dir", "base", "optimizers", "grid", "seeds", "grid_seeds", "grid_seeds_cover", "overrides",
             "report")
GRID_SEEDS_COVER = ("grid", "stable")
"""What `grid_seeds` repeat: the whole grid, or each line's stable range and the point beyond each end
(lm_opt.study.sweep_repeats)."""
REPORT_KEYS = ("margin", "panel")
"""A spec's `report:` options (lm_opt.study.report.write_report), the defaults of `report` on its folder."""
OPTIMIZER_KEYS = ("config", "grid", "overrides")
OPTIMIZER_HEADS = ("optimizer", "routes")
"""First parts of the grid keys that address the OptimizerCallback's init_args."""
LENGTH_KEY = "trainer.max_steps"
SCALED_INTERVALS = ("trainer.val_check_interval", "checkpoint.every_n_train_steps")
"""Step intervals that a point sweeping LENGTH_KEY gets scaled to its own length."""
DONE = ("finished", "diverged")
"""Run statuses that are a result; a rerun leaves such a point alone."""


class SpecError(ValueError):
    """A sweep spec that cannot run; raised before any point launches."""


@contextmanager
def command_endings(command: str) -> Iterator[None]:
    """How `python -m lm_opt <command>` (sweep, card) ends on bad input and on Ctrl-C: one `error:`
    line and exit status 2 (nothing ran), or a note that a rerun resumes and exit status 130."""
    try:
        yield
    except SpecError as err:
        print(f"lm_opt {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{command} interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


@dataclass
class Axis:
    """One swept dimension of a grid."""

    name: str
    """Short label in point names, reports and plots (`lr`, `beta1`, `qk_norm`)."""
    values: list
    """Scalars for one key; mappings of key -> value for a paired axis."""
    key: str | None
    """The dotted key this axis sets; None for a paired axis."""


@dataclass
class Point:
    """One `fit` run of a sweep, in its own folder `run_dir`."""

    name: str
    """The folder and logger name: the optimizer's label, then one fragment per axis."""
    optimizer: str
    """The optimizer's label in the spec."""
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
    """The full config as the CLI resolved it; set by `validate`."""

    def fit_args(self, optimizer_yaml: Path | None = None) -> list[str]:
        """The `fit` arguments; the optimizer YAML is the point's own unless given."""
        configs = [*self.base, str(optimizer_yaml or self.run_dir / OPTIMIZER_YAML)]
        return ["fit", *(a for c in configs for a in ("--config", c)), *self.overrides,
                "--trainer.logger.init_args.save_dir", str(self.run_dir.parent),
                "--trainer.logger.init_args.name", self.name]


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


def _word(value: Any) -> bool:
    """Labels start folder and logger names, so they stay one word."""
    return re.fullmatch(r"[\w.+-]+", str(value)) is not None


def report_options(options: Any) -> dict[str, Any]:
    """A spec's `report:` mapping, checked: `margin` a positive number, `panel` an `AXIS=REGEX` string."""
    options = _mapping(options or {}, "report")
    _check_keys(options, REPORT_KEYS, "report")
    margin = options.get("margin", 0.05)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin <= 0:
        raise SpecError(f"report.margin: needs a positive number of nats, got {margin!r}")
    options["margin"] = margin
    panel = options.get("panel")
    if panel is not None and (not isinstance(panel, str) or "=" not in panel):
        raise SpecError(f"report.panel: needs AXIS=REGEX, e.g. 'width=_w(\\d+)$', got {panel!r}")
    return options


def load_spec(path: str | Path) -> dict:
    """Read and check a spec; every error names the key it is about."""
    if not Path(path).is_file():
        raise SpecError(f"sweep spec {str(path)!r} does not exist")
    try:
        spec = _mapping(read_yaml(path), f"sweep spec {path}")
    except yaml.YAMLError as err:
        raise SpecError(f"sweep spec {invalid_yaml(path, err)}") from None
    _check_keys(spec, SPEC_KEYS, f"sweep spec {path}")
    name = spec.get("name")
    if not isinstance(name, str) or not _word(name):
        raise SpecError(f"sweep spec {path}: `name` must be a word like 'lr_150m', got {name!r}")
    base = spec.get("base") or []
    base = [base] if isinstance(base, str) else base
    spec["base"] = [_existing_file(b, f"base[{i}]") for i, b in enumerate(base)]
    spec["out_dir"] = Path(spec.get("out_dir") or Path("logs") / "sweeps" / name)
    spec["grid"] = _check_grid(spec.get("grid") or {}, "grid")
    for key, what in (("seeds", "extra seeds at each best point"), ("grid_seeds", "extra seeds for the whole grid")):
        seeds = spec.get(key) or []
        if not isinstance(seeds, list) or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(seeds):
            raise SpecError(f"{key}: needs a list of distinct integers ({what}), got {seeds!r}")
        spec[key] = seeds
    if set(spec["seeds"]) & set(spec["grid_seeds"]):
        raise SpecError(f"seeds {spec['seeds']} and grid_seeds {spec['grid_seeds']} share a seed; "
                        "a point would run twice")
    spec["grid_seeds_cover"] = spec.get("grid_seeds_cover", "grid")
    if spec["grid_seeds_cover"] not in GRID_SEEDS_COVER:
        raise SpecError(f"grid_seeds_cover: needs one of {', '.join(GRID_SEEDS_COVER)}, "
                        f"got {spec['grid_seeds_cover']!r}")
    spec["overrides"] = _mapping(spec.get("overrides") or {}, "overrides")
    spec["report"] = report_options(spec.get("report"))
    optimizers = _mapping(spec.get("optimizers"), "optimizers")
    if not optimizers:
        raise SpecError("optimizers: needs at least one optimizer")
    for label, entry in optimizers.items():
        where = f"optimizers.{label}"
        if not _word(label):
            raise SpecError(f"{where}: an optimizer label must be a word (it starts folder names)")
        _check_keys(_mapping(entry, where), OPTIMIZER_KEYS, where)
        _existing_file(entry.get("config"), f"{where}.config")
        entry["grid"] = _check_grid(entry.get("grid") or {}, f"{where}.grid")
        entry["overrides"] = _mapping(entry.get("overrides") or {}, f"{where}.overrides")
        if LENGTH_KEY in entry["grid"]:
            raise SpecError(f"{where}.grid.{LENGTH_KEY}: sweep the length in the shared `grid`, so that each "
                            "length is a line of its own, with its own best point")
    own = [e["overrides"][LENGTH_KEY] for e in optimizers.values() if LENGTH_KEY in e["overrides"]]
    # A length in an optimizer's overrides scales where the spec gives the intervals' reference (a
    # ladder); without it, it is one fixed setting of that optimizer, its intervals as given.
    reference = all(key in spec["overrides"] for key in (LENGTH_KEY, *SCALED_INTERVALS))
    spec["scales_length"] = LENGTH_KEY in spec["grid"] or bool(own) and reference
    if spec["scales_length"]:
        check_length_reference(spec["overrides"], spec["grid"].get(LENGTH_KEY, []) + own)
    return spec


def check_length_reference(overrides: dict, lengths: list) -> None:
    """A spec sweeping the length gives, in its overrides, the length at which its intervals are
    meant and those intervals; the warmup must be a fraction to scale with the run."""
    if not all(type(n) is int and n > 0 for n in lengths):
        raise SpecError(f"{LENGTH_KEY}: the lengths swept need positive integers (steps), got {lengths!r}")
    for key in (LENGTH_KEY, *SCALED_INTERVALS):
        value = overrides.get(key)
        if type(value) is not int or value < 1:
            raise SpecError(f"overrides.{key}: a spec that sweeps {LENGTH_KEY} needs it as a positive integer "
                            f"(the intervals are given at overrides.{LENGTH_KEY} and scaled to each point's "
                            f"length), got {value!r}")
    warmup = overrides.get("model.warmup", 0.0)
    if not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise SpecError(f"overrides.model.warmup: a spec that sweeps {LENGTH_KEY} needs the warmup as a fraction "
                        f"of the run in [0, 1), got {warmup!r}")


def scale_to_length(settings: dict, reference: dict) -> dict:
    """`settings` with each of SCALED_INTERVALS scaled from the reference's length (the spec's
    overrides) to the point's own, at least 1 step: every length validates and checkpoints as often
    per run."""
    ratio = settings[LENGTH_KEY] / reference[LENGTH_KEY]
    return {**settings, **{key: max(1, round(reference[key] * ratio)) for key in SCALED_INTERVALS}}


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


def grid_axes(grid: dict) -> list[Axis]:
    """A checked grid's axes; a paired axis keeps the grid's own key as its name."""
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


def shown_value(value: Any) -> Any:
    """A paired axis that sets one value on all its keys (one lr for two routes) is named, reported
    and plotted by that value; other values as they are."""
    if isinstance(value, dict) and len({repr(v) for v in value.values()}) == 1:
        return next(iter(value.values()))
    return value


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
    """`tree[path[0]][path[1]]...`, or a SpecError naming the first part that is missing."""
    for i, part in enumerate(path):
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            raise SpecError(f"{where}: the optimizer YAML has no {'.'.join(map(str, path[:i + 1]))!r}") from None
    return tree


def set_path(tree: Any, path: list, value: Any, where: str) -> None:
    """Set an existing entry only: a new list index or a scalar parent is a typo in the spec."""
    parent = get_path(tree, path[:-1], where)
    if isinstance(parent, list) and not (isinstance(path[-1], int) and path[-1] < len(parent)):
        raise SpecError(f"{where}: index {path[-1]} is out of range of {parent!r}")
    if not isinstance(parent, (list, dict)):
        raise SpecError(f"{where}: {'.'.join(map(str, path[:-1]))!r} is not a mapping or list")
    parent[path[-1]] = copy.deepcopy(value)


def callback_init_args(optimizer_yaml: dict, config: str) -> dict:
    """The init_args of the one OptimizerCallback in an optimizer YAML (or a resolved config), as
    the mapping in it (lm_opt.callbacks.optimizer.optimizer_args)."""
    from lm_opt.callbacks.optimizer import optimizer_args

    try:
        return optimizer_args(optimizer_yaml, config)
    except UserError as err:
        raise SpecError(str(err)) from None


def cli_value(value: Any) -> str:
    """A value as jsonargparse reads it back (YAML flow style: `1.0e-05`, `true`, `[0.9, 0.95]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("...").strip()


def plan(spec: dict) -> list[Point]:
    """Every point of the sweep, in order: optimizers, then the shared grid, then each optimizer's grid."""
    points, shared = [], grid_axes(spec["grid"])
    for label, entry in spec["optimizers"].items():
        axes = grid_axes(entry["grid"]) + shared
        short = [a.name for a in axes]  # two keys that shorten alike keep their full names
        names = [a.key if a.key and short.count(a.name) > 1 else a.name for a in axes]
        source = read_yaml(entry["config"])
        for shared_combo in itertools.product(*(a.values for a in shared)):
            for own_combo in itertools.product(*(a.values for a in axes[:len(axes) - len(shared)])):
                combo = own_combo + shared_combo
                settings = {**spec["overrides"], **entry["overrides"]}
                for axis, value in zip(axes, combo):
                    settings.update(value if axis.key is None else {axis.key: value})
                if spec.get("scales_length"):
                    settings = scale_to_length(settings, spec["overrides"])
                shown = [shown_value(v) for v in combo]
                name = "_".join([label, *(fragment(n, v) for n, v in zip(names, shown))])
                optimizer_yaml, overrides = split_settings(name, label, settings, source, entry["config"])
                points.append(Point(name, label, dict(zip(names, shown)), names[len(axes) - len(shared):],
                                    spec["out_dir"] / name, optimizer_yaml, spec["base"], overrides))
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            raise SpecError(f"points {seen[p.name].values} and {p.values} of {p.optimizer!r} share the name "
                            f"{p.name!r}; use values that differ in 3 significant digits")
        seen[p.name] = p
    return points


def with_seed(point: Point, seed: int) -> Point:
    """The same run as `point` with another `seed_everything`, in its own folder."""
    name = f"{point.name}_seed{seed}"
    return Point(name, point.optimizer, {**point.values, "seed": seed}, point.shared, point.run_dir.parent / name,
                 point.optimizer_yaml, point.base, [*point.overrides, "--seed_everything", str(seed)])


def line_of(point: Point) -> tuple:
    """The optimizer and shared-grid values: the points among which one is best."""
    return point.optimizer, tuple(format_value(point.values[k]) for k in point.shared)


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
