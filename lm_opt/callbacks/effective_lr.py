"""Quantiles of the effective per-coordinate learning rate, read from optimizer state.

The effective lr of a coordinate is `lr_t / (sqrt(v_hat_t) + eps)`: the step size an
adaptive method really takes per unit of momentum. The study plots its quantiles per layer
over training; for Adalayer it is one value per block (per logit in the last layer). These
quantiles are lm_opt's own definition of that figure: the study's public code logs the min,
max, mean and norm of the raw second moment `exp_avg_sq` instead.

Everything is computed where the optimizer state lives (the GPU): the sorts for the quantiles
and the histogram counts. Only the few numbers that are logged are copied to the host, in one
transfer per logging event.
"""

from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lm_opt.callbacks.optimizer import clean_name
from lm_opt.errors import UserError
from lm_opt.optim.composite import CompositeOptimizer

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def adam_effective_lr(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> torch.Tensor | None:
    """`lr / (sqrt(v / (1 - beta2^t)) + eps)` from torch's Adam/AdamW state."""
    state = optimizer.state.get(p)
    if not state or "exp_avg_sq" not in state:
        return None
    step = float(state["step"])
    v_hat = state["exp_avg_sq"].float() / (1 - group["betas"][1] ** step)
    return group["lr"] / (v_hat.sqrt() + group["eps"])


def effective_lrs(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, effective lr tensor) for every parameter whose optimizer defines one."""
    inner = optimizer.optimizers if isinstance(optimizer, CompositeOptimizer) else [optimizer]
    for opt in inner:
        for group in opt.param_groups:
            for p in group["params"]:
                if hasattr(opt, "effective_lr"):
                    eff = opt.effective_lr(p)
                elif isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                    eff = adam_effective_lr(opt, group, p)
                else:
                    eff = None
                if eff is not None:
                    yield names[id(p)], eff


HISTOGRAM_BINS = 64


def histogram(x: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """`[min, max, count, sum, sum of squares, bin edges (bins + 1), bin counts (bins)]` of x,
    computed on x's device, as TensorBoard's raw histogram wants them."""
    x = x.detach().flatten().float()
    low, high = x.min(), x.max()
    width = torch.where(high > low, high - low, torch.ones_like(high))
    edges = low + width * torch.linspace(0, 1, bins + 1, device=x.device)
    counts = torch.histc((x - low) / width, bins=bins, min=0.0, max=1.0)
    stats = torch.stack([low, high, torch.tensor(float(x.numel()), device=x.device), x.sum(), x.square().sum()])
    return torch.cat([stats, edges, counts])


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = QUANTILES) -> torch.Tensor:
    """Nearest-rank quantiles of all entries of x: entry `round(q (n - 1))` of x sorted
    (torch.quantile refuses over 2^24 entries)."""
    flat = x.detach().flatten().float()
    ranks = [round(q * (flat.numel() - 1)) for q in qs]
    return (partitioned if flat.device.type == "cpu" else sorted_)(flat, ranks)


def sorted_(flat: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Entries `ranks` of `flat` sorted, by a sort: on a GPU, where sorting is fast."""
    return flat.sort().values[torch.tensor(ranks, device=flat.device)]


def partitioned(flat: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """Entries `ranks` of `flat` sorted, by one multi-rank selection (numpy's introselect): on
    CPU 5x faster than a sort for the 2M logits x width of the CPU study's last layer."""
    return torch.from_numpy(np.partition(flat.numpy(), ranks)[ranks])


class EffectiveLRQuantiles(L.Callback):
    """Logs `eff_lr/<parameter>/q<percent>` every `every_n_steps` optimizer steps, and
    TensorBoard histograms.

    For a last layer whose effective lr has one value per coordinate or per row, it also logs
    the spread across logits: quantiles of each row's median, `eff_lr/<parameter>/rows/q<percent>`.
    It fires once per optimizer step, after it: with gradient accumulation the micro-batches
    that follow see the same state and are skipped.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        """
        Args:
            every_n_steps: Log every this many optimizer steps; 0 turns the callback off.
            histograms: Also log each tensor's distribution as a TensorBoard histogram.
        """
        if every_n_steps < 0:
            raise UserError(f"eff_lr.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.logged_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (not self.every_n_steps or step % self.every_n_steps or step == self.logged_step
                or not trainer.optimizers or not trainer.is_global_zero):
            return
        self.logged_step = step
        names = {id(p): clean_name(n) for n, p in pl_module.model.named_parameters()}
        roles = pl_module.model.param_roles()
        tags, values, histograms = [], [], {}
        for name, eff in effective_lrs(trainer.optimizers[0], names):
            tags += [f"eff_lr/{name}/q{round(q * 100)}" for q in QUANTILES]
            values.append(quantiles(eff))
            if roles[name] == "last_layer" and eff.dim() >= 1 and eff.numel() > 1:
                rows = eff.reshape(eff.size(0), -1).median(dim=1).values
                tags += [f"eff_lr/{name}/rows/q{round(q * 100)}" for q in QUANTILES]
                values.append(quantiles(rows))
            if self.histograms and isinstance(pl_module.logger, TensorBoardLogger):
                histograms[f"eff_lr/{name}"] = histogram(eff)
        if not tags:
            return
        # One device-to-host copy for everything this event logs.
        sizes = [len(tags), *(h.numel() for h in histograms.values())]
        host = torch.cat([torch.cat(values), *histograms.values()]).cpu().double().split(sizes)
        # Straight to the loggers, at the index of the step just taken (as train/loss): Lightning's
        # self.log would repeat the cached values at later steps.
        for logger in trainer.loggers:
            logger.log_metrics(dict(zip(tags, host[0].tolist())), step=step - 1)
        for (tag, _), raw in zip(histograms.items(), host[1:]):
            low, high, num, total, squares = raw[:5].tolist()
            edges, counts = raw[5:6 + HISTOGRAM_BINS], raw[6 + HISTOGRAM_BINS:]
            pl_module.logger.experiment.add_histogram_raw(
                tag, low, high, num, total, squares, bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(), global_step=step - 1)
