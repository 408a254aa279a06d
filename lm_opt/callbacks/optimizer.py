"""Optimizer choice and per-group routing, as a callback.

Routes are ordered; each selects parameters by role (`embedding`, `matrix`, `norm`,
`last_layer`) and optionally a name pattern, and names an optimizer by `class_path` and
`init_args`. The first matching route takes a parameter. The routes' optimizers are built
when Lightning calls `configure_optimizers`, after DDP/FSDP have wrapped the model, and are
joined into one `CompositeOptimizer` when there are several.
"""

import re
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from lm_opt.errors import UserError
from lm_opt.model import GPT, ROLES
from lm_opt.optim.composite import CompositeOptimizer

# torch's optimizers whose statistics span whole tensors (lm_opt's all run on FSDP2 shards).
WHOLE_TENSOR = {
    torch.optim.Muon: "its Newton-Schulz orthogonalization needs the whole matrix and it updates parameters "
    "in place; lm_opt.optim.Muon computes the same update on shards",
}


def sharding_obstacle(cls: type) -> str | None:
    """Why `cls` cannot update FSDP's parameter shards exactly, or None if it can."""
    return WHOLE_TENSOR.get(cls)


def sharding_scheme(cls: type) -> str:
    """How `cls` updates parameter shards: its own `sharding_scheme`, else elementwise."""
    return getattr(cls, "sharding_scheme", None) or "elementwise on each shard, no communication"


# Prefixes that wrappers (torch.compile, FSDP, activation checkpointing) add to parameter names.
_WRAPPER_PREFIXES = re.compile(r"(_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


@dataclass
class Route:
    """Parameters selected by role and name pattern, and the optimizer that updates them."""

    optimizer: dict[str, Any]
    """`{class_path: ..., init_args: {...}}` of a torch.optim.Optimizer (lr, betas, ...)."""
    roles: list[str] | None = None
    """Roles this route takes (`embedding`, `matrix`, `norm`, `last_layer`); None takes any."""
    pattern: str | None = None
    """Regular expression a parameter name must contain (re.search), e.g. `blocks\\.0\\.`."""
    name: str | None = None
    """Label in the routing table and the logs; defaults to the roles."""

    def __post_init__(self):
        unknown = set(self.roles or []) - set(ROLES)
        if unknown:
            raise UserError(f"route roles {sorted(unknown)} are unknown; expected some of {list(ROLES)}")
        if "class_path" not in self.optimizer:
            raise UserError(f"route optimizer {self.optimizer} needs a class_path")
        self.name = self.name or "+".join(self.roles or ["all"])

    def describe(self) -> str:
        """The route as its config gives it: label, roles and pattern."""
        return f"route {self.name!r} (roles {self.roles or 'any'}, pattern {self.pattern!r})"

    def matches(self, name: str, role: str) -> bool:
        return (self.roles is None or role in self.roles) and (
            self.pattern is None or re.search(self.pattern, name) is not None
        )


def clean_name(name: str) -> str:
    return _WRAPPER_PREFIXES.sub("", name)


def route_parameters(model: GPT, routes: list[Route]) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The (name, parameter) pairs each route takes, first match wins.

    Raises:
        UserError: naming the parameters no route covers, or the roles and pattern of a route that
            takes nothing.
    """
    roles = model.param_roles()
    taken: list[list[tuple[str, torch.nn.Parameter]]] = [[] for _ in routes]
    uncovered = []
    for raw_name, p in model.named_parameters():
        name = clean_name(raw_name)
        index = next((i for i, r in enumerate(routes) if r.matches(name, roles[name])), None)
        if index is None:
            uncovered.append(f"{name} ({roles[name]})")
        else:
            taken[index].append((name, p))
    if uncovered:
        raise UserError(f"no route covers these parameters: {', '.join(uncovered)}; add a route for their roles")
    for route, params in zip(routes, taken):
        if not params:
            matching = sum(route.matches(name, role) for name, role in roles.items())
            why = (f"earlier routes took all {matching} parameters it matches" if matching else
                   "no parameter has one of its roles and a name that contains the pattern")
            raise UserError(f"{route.describe()} takes no parameter: {why}")
    return taken


def param_groups(model: GPT, named: list[tuple[str, torch.nn.Parameter]], route: Route, optimizer_cls: type) -> list[dict]:
    """One param group per role (and per block layout, for optimizers that have one)."""
    roles = model.param_roles()
    groups: dict[tuple, dict] = {}
    for name, p in named:
        role = roles[name]
        key: tuple = (role,)
        extra = {"name": f"{route.name}/{role}"}
        if hasattr(optimizer_cls, "block_layout"):
            blocks = optimizer_cls.block_layout(role, n_head=model.config.n_head, fused=model.fused_projections(name))
            key, extra = (role, blocks), {"blocks": blocks, "name": f"{route.name}/{role}/blocks={blocks}"}
        group = groups.setdefault(key, {"params": [], "param_names": [], "role": role, "route": route.name, **extra})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def _class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"optimizer class_path {class_path!r} cannot be imported: {err}") from err


def check_hyperparameters(route: Route, cls: type) -> None:
    """Build the route's optimizer on a dummy parameter, so a bad value fails at parse time."""
    try:
        instantiate_class([torch.nn.Parameter(torch.zeros(2, 2))], route.optimizer)
    except (ValueError, TypeError) as err:
        raise UserError(f"route {route.name!r}: {cls.__name__} rejects init_args "
                        f"{route.optimizer.get('init_args', {})}: {err}") from err


class OptimizerCallback(L.Callback):
    """Owns the optimizer: one for every parameter (`optimizer`), or ordered `routes`."""

    def __init__(self, optimizer: dict[str, Any] | None = None, routes: list[Route] | None = None):
        """
        Args:
            optimizer: `{class_path, init_args}` of one optimizer for all parameters.
            routes: Ordered routes; the first whose roles and pattern match takes a parameter.
        """
        if (optimizer is None) == (routes is None):
            raise UserError("OptimizerCallback takes exactly one of `optimizer` and `routes`")
        self.routes = [Route(optimizer=optimizer)] if optimizer is not None else [
            r if isinstance(r, Route) else Route(**r) for r in routes
        ]
        self.classes = [_class(r.optimizer["class_path"]) for r in self.routes]
        for route, cls in zip(self.routes, self.classes):
            check_hyperparameters(route, cls)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        route_parameters(pl_module.model, self.routes)  # fail on a bad routing before any compute
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            for route, cls in zip(self.routes, self.classes):
                if reason := sharding_obstacle(cls):
                    raise UserError(f"route {route.name!r}: {cls.__name__} cannot run under "
                                    f"{type(trainer.strategy).__name__}, which shards parameters: {reason}; "
                                    "use strategy: ddp, or an lm_opt.optim optimizer")
                rank_zero_info(f"route {route.name!r}: {cls.__name__} on parameter shards: {sharding_scheme(cls)}")
        pl_module.optimizer_factory = self.build
        pl_module.schedule_hold_steps = self.hold_steps

    @property
    def hold_steps(self) -> int:
        """Frozen Adalayer's accumulation steps: they run at lr 0, the schedule starts after them,
        and the run is lengthened by them (the study trains 25000 steps after 1000 of them)."""
        return max(r.optimizer.get("init_args", {}).get("freeze_after") or 0 for r in self.routes)

    @staticmethod
    def _modal_optimizers(trainer: L.Trainer) -> list[torch.optim.Optimizer]:
        """Inner optimizers with train()/eval() modes (Schedule-Free keeps y and x)."""
        inner = [o for opt in trainer.optimizers for o in getattr(opt, "optimizers", [opt])]
        return [o for o in inner if callable(getattr(o, "train", None)) and callable(getattr(o, "eval", None))]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Evaluate, and checkpoint (ModelCheckpoint saves at the end of validation), the averaged x.
        for opt in self._modal_optimizers(trainer):
            opt.eval()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        for opt in self._modal_optimizers(trainer):
            opt.train()

    def build(self, model: GPT) -> torch.optim.Optimizer:
        optimizers = []
        for route, cls, named in zip(self.routes, self.classes, route_parameters(model, self.routes)):
            groups = param_groups(model, named, route, cls)
            optimizers.append(instantiate_class(groups, route.optimizer))
        rank_zero_info(routing_table(self.routes, optimizers))
        return optimizers[0] if len(optimizers) == 1 else CompositeOptimizer(optimizers)


def routing_table(routes: list[Route], optimizers: list[torch.optim.Optimizer]) -> str:
    rows = [("route", "optimizer", "lr", "tensors", "parameters")]
    for route, opt in zip(routes, optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        rows.append((route.name, type(opt).__name__, f"{opt.param_groups[0]['lr']:g}", str(len(params)),
                     f"{sum(p.numel() for p in params):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "optimizer routing:\n" + "\n".join(lines)
