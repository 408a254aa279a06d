"""The optional methods by which an optimizer tells the training loop what else it needs.

The training loop (lm_opt.module's schedule, lm_opt.callbacks.optimizer, lm_opt.cli's run length)
knows an optimizer's extra needs by these methods alone, never by its name. An optimizer defines
the ones it needs; a CompositeOptimizer (routes) is asked through its inner optimizers.

- `hold_steps() -> int` (`Holding`): steps at the start of the run in which the optimizer only
  gathers statistics. The lr schedule stays at 0 through them and starts after them, and the run
  is lengthened by them, so that it still trains `max_steps` after them (Frozen Adalayer's
  `freeze_after`: the study trains 25000 steps after 1000 of them).
- `train()` and `eval()` (`Modal`): put the point to train at, or the point to evaluate, into the
  parameters (Schedule-Free's y and its average x). Validation, and the checkpoint saved at its
  end, see `eval()`'s; every training batch sees `train()`'s.
"""

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Holding(Protocol):
    """An optimizer whose first steps run at lr 0 while it gathers statistics."""

    def hold_steps(self) -> int: ...


@runtime_checkable
class Modal(Protocol):
    """An optimizer that trains at one point and is evaluated at another."""

    def train(self) -> None: ...

    def eval(self) -> None: ...


def inner(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.optim.Optimizer]:
    """The optimizers themselves, a CompositeOptimizer as the optimizers of its routes."""
    return [o for opt in optimizers for o in getattr(opt, "optimizers", [opt])]


def hold_steps(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """The longest hold among `optimizers`; 0 where none holds."""
    return max((o.hold_steps() for o in inner(optimizers) if isinstance(o, Holding)), default=0)


def set_mode(optimizers: Iterable[torch.optim.Optimizer], training: bool) -> None:
    """Put every modal optimizer among `optimizers` into its training or its evaluation point."""
    for o in inner(optimizers):
        if isinstance(o, Modal) and training:
            o.train()
        elif isinstance(o, Modal):
            o.eval()
