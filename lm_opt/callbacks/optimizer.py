"""Optimizer choice and per-group routing, as a callback: the user's config and Lightning's hooks.

`OptimizerCallback` takes one optimizer for every parameter, or ordered routes (lm_opt.optim.routing
routes, builds and checks them). The routes' optimizers are built when Lightning calls
`configure_optimizers`, after DDP/FSDP have wrapped the model. An optimizer's extra needs reach the
loop through lm_opt.optim.hooks: its lr-0 steps (`hold_steps`) lengthen the run and hold the
schedule, and a modal optimizer (Schedule-Free) is evaluated at its evaluation point.

`optimizer_args` and `OptimizerCallback.of` are the one place that finds the optimizer in a
config's, or a trainer's, callbacks.
"""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from lm_opt.errors import UserError
from lm_opt.model import GPT
from lm_opt.optim import hooks
from lm_opt.optim.routing import Route, Routing, clean_name

__all__ = ["OptimizerCallback", "Route", "clean_name", "optimizer_args"]


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
        self.routing = Routing([Route(optimizer=optimizer)] if optimizer is not None else [
            r if isinstance(r, Route) else Route(**r) for r in routes
        ])

    @property
    def classes(self) -> list[type]:
        """Each route's optimizer class."""
        return self.routing.classes

    @property
    def hold_steps(self) -> int:
        """Steps at lr 0 that the run is lengthened by (lm_opt.optim.hooks)."""
        return self.routing.hold_steps

    @classmethod
    def of(cls, trainer: L.Trainer) -> "OptimizerCallback":
        """The trainer's one OptimizerCallback."""
        found = [c for c in trainer.callbacks if isinstance(c, cls)]
        if len(found) != 1:
            raise UserError(f"trainer.callbacks must hold exactly one lm_opt.callbacks.OptimizerCallback, "
                            f"found {len(found)} (add one, e.g. --config configs/optim/adamw.yaml)")
        return found[0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.routing.check(pl_module.model)  # fail on a bad routing before any compute
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            for line in self.routing.on_shards(type(trainer.strategy).__name__):
                rank_zero_info(line)
        pl_module.optimizer_factory = self.build

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Evaluate, and checkpoint (ModelCheckpoint saves at the end of validation), the averaged x.
        hooks.set_mode(trainer.optimizers, training=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        hooks.set_mode(trainer.optimizers, training=True)

    def build(self, model: GPT) -> torch.optim.Optimizer:
        optimizer, table = self.routing.build(model)
        rank_zero_info(table)
        return optimizer


def optimizer_args(config: dict, where: str) -> dict[str, Any]:
    """The init_args of the one OptimizerCallback in a config's `trainer.callbacks` (an optimizer
    YAML, a resolved or recorded config), as the mapping in `config` itself: setting a key in it
    sets it in the config. `where` names the config in the error.

    Raises:
        UserError: where the config holds no OptimizerCallback, or several.
    """
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    found = [c for c in callbacks if isinstance(c, dict) and str(c.get("class_path", "")).endswith("OptimizerCallback")]
    if len(found) != 1:
        raise UserError(f"{where}: needs exactly one OptimizerCallback in trainer.callbacks, found {len(found)}")
    if found[0].get("init_args") is None:
        found[0]["init_args"] = {}
    return found[0]["init_args"]
