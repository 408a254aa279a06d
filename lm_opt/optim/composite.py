"""Several optimizers behind one `torch.optim.Optimizer`, for per-group routing."""

from collections.abc import Iterator, MutableMapping
from itertools import chain
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
        """torch's layout over every route: ``state`` and ``param_groups`` with the parameters
        numbered across the inner optimizers in order, as ``param_groups`` lists them, so that
        ``torch.distributed.checkpoint`` names each state by its parameter (FSDP2 checkpoints)."""
        state, groups = {}, []
        for opt in self.optimizers:
            inner = opt.state_dict()
            offset = sum(len(g["params"]) for g in groups)
            saved_ids = chain.from_iterable(g["params"] for g in inner["param_groups"])
            number = {k: offset + i for i, k in enumerate(saved_ids)}
            state.update({number[k]: v for k, v in inner["state"].items()})
            groups += [{**g, "params": [number[k] for k in g["params"]]} for g in inner["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s layout, whatever its keys (``torch.distributed.checkpoint``
        passes parameter names): the first groups go to the first route's optimizer, and so on."""
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"checkpoint optimizer state has {len(groups)} param groups; "
                             f"this run's routes have {len(self.param_groups)}")
        start = 0
        for opt in self.optimizers:
            mine = groups[start:start + len(opt.param_groups)]
            start += len(mine)
            keys = set(chain.from_iterable(g["params"] for g in mine))
            opt.load_state_dict({"state": {k: v for k, v in state_dict["state"].items() if k in keys},
                                 "param_groups": mine})
        # torch's load_state_dict gives each inner optimizer new group dicts: share them again,
        # or an LR scheduler would keep writing into the old ones.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def owner(self, p: torch.Tensor) -> Optimizer:
        """The inner optimizer that updates `p`."""
        return self.state._owner(p)
