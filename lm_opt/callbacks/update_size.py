"""The size of each optimizer step relative to the weights: a diagnostic for any optimizer.

Every `every_n_steps` optimizer steps, the parameters are copied just before the step and
compared with themselves just after it. Logged at the index of the step taken, as `eff_lr/` is:

- `update/<parameter>/rel_norm`: `||theta_t - theta_{t-1}|| / ||theta_{t-1}||` (inf for a tensor
  that was all zeros);
- `update/<parameter>/q<percent>`: quantiles of `|theta_t - theta_{t-1}|` over its entries;
- `update_rel_norm/q<percent>`: quantiles of the per-tensor `rel_norm` across all tensors.

It reads nothing from the optimizer, so a stateless or exotic one (SGD, Lion, Muon, Prodigy)
gets a picture of its steps; what it measures is what the weights did, weight decay and any
rescaling inside the optimizer included. Cost: one copy of the parameters, held from just
before to just after the step, on the logging steps only.

Sharded (DTensor) parameters: each rank copies and compares its own shard, and the squared norms
of all tensors are summed across ranks in one all-reduce; the per-entry quantiles, which would
need each tensor gathered, are left out.
"""

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lm_opt.callbacks.effective_lr import QUANTILES, EffectiveLRQuantiles, quantiles
from lm_opt.callbacks.optimizer import clean_name
from lm_opt.errors import UserError

DEFAULT_EVERY = 50  # EffectiveLRQuantiles' default, where a run has none


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def squared_norms(before: list[torch.Tensor], after: list[torch.Tensor], sharded: list[bool]) -> torch.Tensor:
    """`[n, 2]`: `||after - before||^2` and `||before||^2` of each tensor (float32 or wider). The
    rows of sharded tensors are this rank's shard's, summed over the ranks of their (1-D) mesh."""
    rows = torch.stack([torch.stack([(a.float() - b.float()).square().sum(), b.float().square().sum()])
                        for b, a in zip(before, after)])
    if any(sharded) and dist.is_initialized():
        mask = torch.tensor(sharded, device=rows.device)[:, None]
        summed = rows * mask
        dist.all_reduce(summed)  # FSDP2Strategy's mesh is every process, on one data-parallel axis
        rows = torch.where(mask, summed, rows)
    return rows


def relative_norms(norms: torch.Tensor) -> torch.Tensor:
    """`||delta|| / ||theta||` per tensor from `squared_norms`' rows."""
    return norms[:, 0].sqrt() / norms[:, 1].sqrt()


class UpdateSizeQuantiles(L.Callback):
    """Logs `update/<parameter>/rel_norm`, `update/<parameter>/q<percent>` and
    `update_rel_norm/q<percent>` every `every_n_steps` optimizer steps (module docstring)."""

    def __init__(self, every_n_steps: int | None = None, elementwise: bool = True):
        """
        Args:
            every_n_steps: Log every this many optimizer steps; None follows `eff_lr.every_n_steps`
                (50 without an EffectiveLRQuantiles callback); 0 turns it off.
            elementwise: Also log quantiles of `|delta theta|` per (unsharded) tensor.
        """
        if every_n_steps is not None and every_n_steps < 0:
            raise UserError(f"update_size.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.elementwise = elementwise
        self.every = every_n_steps
        self.before: list[torch.Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps is None:
            eff_lr = [c for c in trainer.callbacks if isinstance(c, EffectiveLRQuantiles)]
            self.every = eff_lr[0].every_n_steps if eff_lr else DEFAULT_EVERY

    @staticmethod
    def _parameters(pl_module: L.LightningModule) -> list[tuple[str, torch.Tensor]]:
        return [(clean_name(n), p) for n, p in pl_module.model.named_parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        # global_step counts the steps taken: this one will be step global_step + 1.
        if not self.every or (trainer.global_step + 1) % self.every:
            return
        named = self._parameters(pl_module)
        # Other ranks take part only where the norms are summed over shards.
        if trainer.is_global_zero or any(isinstance(p, DTensor) for _, p in named):
            self.before = [local(p.detach()).clone() for _, p in named]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.before is None:
            return  # not a logging step, or a micro-batch that did not step
        before, self.before = self.before, None
        named = self._parameters(pl_module)
        after = [local(p.detach()) for _, p in named]
        sharded = [isinstance(p, DTensor) for _, p in named]
        ratios = relative_norms(squared_norms(before, after, sharded))  # every rank: it may all-reduce
        if not trainer.is_global_zero:
            return
        tags = [f"update/{name}/rel_norm" for name, _ in named]
        values = [ratios, quantiles(ratios)]
        tags += [f"update_rel_norm/q{round(q * 100)}" for q in QUANTILES]
        for (name, _), b, a, split in zip(named, before, after, sharded):
            if self.elementwise and not split:
                tags += [f"update/{name}/q{round(q * 100)}" for q in QUANTILES]
                values.append(quantiles((a.float() - b.float()).abs()))
        host = torch.cat([v.float() for v in values]).cpu().double().tolist()  # one device-to-host copy
        for logger in trainer.loggers:
            logger.log_metrics(dict(zip(tags, host)), step=trainer.global_step - 1)
