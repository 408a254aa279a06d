"""Several optimizers behind one `torch.optim.Optimizer`, for per-group routing."""

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch.optim import Optimizer


class _StateView(MutableMapping):
    """`optimizer.state` of a composite: each parameter's state lives in the optimizer that owns it."""

    def __init__(self, optimizers: list[Optimizer]):
        self.optimizers = optimizers

    def _owner(self, p: torch.Tensor) -> Optimizer:
        for opt in self.optimizers:
            if any(p is q for group in opt.param_groups for q in group["params"]):
                return opt
        raise KeyError(p)

    def __getitem__(self, p):
        return self._owner(p).state[p]

    def __setitem__(self, p, value):
        self._owner(p).state[p] = value

    def __delitem__(self, p):
        del self._owner(p).state[p]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for opt in self.optimizers for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self.optimizers)


class CompositeOptimizer(Optimizer):
    """One optimizer object whose `param_groups` are the groups of `optimizers`, in order.

    The groups are the same dict objects as the inner optimizers', so an LR scheduler,
    gradient clipping and `LearningRateMonitor` act on every route through the composite,
    and each inner optimizer reads the lr the scheduler wrote. The state dict is the list
    of the inner state dicts.
    """

    def __init__(self, optimizers: list[Optimizer]):
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], defaults={})
        self.state = _StateView(self.optimizers)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if inner is None or len(inner) != len(self.optimizers):
            found = "no composite state" if inner is None else f"{len(inner)} optimizers"
            raise ValueError(f"checkpoint optimizer state has {found}; this run routes to {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, inner):
            opt.load_state_dict(sd)
        # torch's load_state_dict gives each inner optimizer new group dicts: share them again,
        # or an LR scheduler would keep writing into the old ones.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def owner(self, p: torch.Tensor) -> Optimizer:
        """The inner optimizer that updates `p`."""
        return self.state._owner(p)
