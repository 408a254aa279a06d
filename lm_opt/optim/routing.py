"""Routing parameters to optimizers by role, and building the optimizer of a model.

Routes are ordered; each selects parameters by role (`embedding`, `matrix`, `norm`, `last_layer`:
the roles of lm_opt.model's parameter kinds) and optionally a name pattern, and names an optimizer
by `class_path` and `init_args`. The first matching route takes a parameter; a parameter that no
route takes, and a route that takes nothing, are errors that name them. Each route's optimizer gets
one param group per role (and per block layout, for optimizers that have a `block_layout`), and the
routes' optimizers are joined into one `CompositeOptimizer` when there are several.

This module needs torch and the model's parameter kinds only; lm_opt.callbacks.optimizer is the
user's config of it and its place in Lightning's loop.
"""

import re
from dataclasses import dataclass
from typing import Any

import torch

from lm_opt.errors import UserError
from lm_opt.model import FUSED_PROJECTIONS, GPT, KIND_ROLES, ROLES
from lm_opt.optim import hooks
from lm_opt.optim.composite import CompositeOptimizer

# torch's optimizers whose statistics span whole tensors (lm_opt's all run on FSDP2 shards).
WHOLE_TENSOR = {
    torch.optim.Muon: "its Newton-Schulz orthogonalization needs the whole matrix and it updates parameters "
    "in place; lm_opt.optim.Muon computes the same update on shards",
    torch.optim.Adafactor: "its row and column statistics span the whole matrix; lm_opt.optim.Adafactor computes "
    "them on shards",
}
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
               torch.optim.Adamax, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.Rprop,
               torch.optim.ASGD)
"""torch's optimizers that update each entry from that entry's gradient and state alone: on a
parameter shard they compute exactly their update of the whole tensor's entries."""


def sharding_obstacle(cls: type, elementwise: bool = False) -> str | None:
    """Why `cls` cannot be shown to update FSDP's parameter shards exactly, or None if it can: lm_opt's
    own optimizers (each elementwise or declaring its `sharding_scheme`), torch's elementwise ones, and
    a class a route declares `elementwise`."""
    if cls in WHOLE_TENSOR:
        return WHOLE_TENSOR[cls]
    if elementwise or issubclass(cls, ELEMENTWISE) or cls.__module__.startswith("lm_opt."):
        return None
    return ("lm_opt cannot show that it updates each entry from that entry's gradient and state alone, and a "
            "whole-tensor optimizer (a SOAP, Shampoo or Muon) on shards computes another update without a warning; "
            "if it is elementwise, declare it with `elementwise: true` on its route (lm_opt's owner scheme for "
            "whole-tensor optimizers cannot wrap another package's class)")


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
    elementwise: bool = False
    """Declares that the optimizer updates each entry from that entry alone, so that it may run on
    FSDP2's parameter shards as it is (lm_opt knows this of its own and of torch's optimizers)."""

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
    kinds = model.param_kinds()
    groups: dict[tuple, dict] = {}
    for name, p in named:
        role = KIND_ROLES[kinds[name]]
        key: tuple = (role,)
        extra = {"name": f"{route.name}/{role}"}
        if hasattr(optimizer_cls, "block_layout"):
            blocks = optimizer_cls.block_layout(role, n_head=model.config.n_head,
                                                fused=FUSED_PROJECTIONS.get(kinds[name], 1))
            key, extra = (role, blocks), {"blocks": blocks, "name": f"{route.name}/{role}/blocks={blocks}"}
        group = groups.setdefault(key, {"params": [], "param_names": [], "role": role, "route": route.name, **extra})
        group["params"].append(p)
        group["param_names"].append(name)
    return list(groups.values())


def optimizer_class(class_path: str) -> type:
    """The class a `class_path` names (`torch.optim.AdamW`, `lm_opt.optim.Lion`)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"class_path {class_path!r} cannot be imported: {err}") from err


def instantiate(params: Any, optimizer: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer `{class_path, init_args}` over `params` (parameters or param groups)."""
    return optimizer_class(optimizer["class_path"])(params, **nested_objects(optimizer.get("init_args", {})))


def nested_objects(value: Any) -> Any:
    """`value` with every `{class_path, init_args}` inside it made into its object (a grafting config,
    a preconditioner's settings), as jsonargparse makes the optimizer itself."""
    if isinstance(value, dict) and "class_path" in value and set(value) <= {"class_path", "init_args"}:
        return optimizer_class(value["class_path"])(**nested_objects(value.get("init_args") or {}))
    if isinstance(value, dict):
        return {key: nested_objects(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(nested_objects(v) for v in value)
    return value


def check_hyperparameters(route: Route, cls: type) -> torch.optim.Optimizer:
    """The route's optimizer built on a dummy parameter, so that a bad value fails at parse time."""
    try:
        return instantiate([torch.nn.Parameter(torch.zeros(2, 2))], route.optimizer)
    except (ValueError, TypeError) as err:
        raise UserError(f"route {route.name!r}: {cls.__name__} rejects init_args "
                        f"{route.optimizer.get('init_args', {})}: {err}") from err


def routing_table(routes: list[Route], optimizers: list[torch.optim.Optimizer]) -> str:
    rows = [("route", "optimizer", "lr", "tensors", "parameters")]
    for route, opt in zip(routes, optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        rows.append((route.name, type(opt).__name__, f"{opt.param_groups[0]['lr']:g}", str(len(params)),
                     f"{sum(p.numel() for p in params):,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "optimizer routing:\n" + "\n".join(lines)


class Routing:
    """Ordered routes and their optimizers' classes, checked when made (every class imports, every
    route's init_args build an optimizer): what builds the optimizer of a model."""

    def __init__(self, routes: list[Route]):
        self.routes = routes
        self.classes = [optimizer_class(r.optimizer["class_path"]) for r in routes]
        probes = [check_hyperparameters(route, cls) for route, cls in zip(routes, self.classes)]
        self.hold_steps = hooks.hold_steps(probes)
        """Steps at lr 0 before the schedule starts, that lengthen the run (lm_opt.optim.hooks)."""

    def check(self, model: GPT) -> None:
        """Fail on a parameter of `model` that no route takes, or a route that takes none."""
        route_parameters(model, self.routes)

    def on_shards(self, strategy: str) -> list[str]:
        """How each route's optimizer updates parameter shards, one line per route.

        Raises:
            UserError: naming the first route whose optimizer cannot run under `strategy`, which
                shards parameters.
        """
        lines = []
        for route, cls in zip(self.routes, self.classes):
            if reason := sharding_obstacle(cls, route.elementwise):
                raise UserError(f"route {route.name!r}: {cls.__name__} cannot run under {strategy}, which shards "
                                f"parameters: {reason}; or use strategy: ddp, or an lm_opt.optim optimizer")
            lines.append(f"route {route.name!r}: {cls.__name__} on parameter shards: {sharding_scheme(cls)}")
        return lines

    def build(self, model: GPT) -> tuple[torch.optim.Optimizer, str]:
        """The model's optimizer (the routes' optimizers, joined where there are several) and its
        routing table."""
        optimizers = [instantiate(param_groups(model, named, route, cls), route.optimizer)
                      for route, cls, named in zip(self.routes, self.classes, route_parameters(model, self.routes))]
        optimizer = optimizers[0] if len(optimizers) == 1 else CompositeOptimizer(optimizers)
        return optimizer, routing_table(self.routes, optimizers)
