"""Quantiles of the effective per-coordinate learning rate, read from optimizer state.

The effective lr of a coordinate is `lr_t / (sqrt(v_hat_t) + eps)`: the step size an
adaptive method really takes per unit of momentum. The study plots its quantiles per layer
over training; for Adalayer it is one value per block (per logit in the last layer).
"""

from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lm_opt.callbacks.optimizer import clean_name
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


def quantiles(x: torch.Tensor, qs: tuple[float, ...] = QUANTILES) -> torch.Tensor:
    """Nearest-rank quantiles of all entries of x (torch.quantile refuses over 2^24 entries)."""
    flat = x.detach().flatten().float().sort().values
    index = torch.tensor([round(q * (flat.numel() - 1)) for q in qs], device=flat.device)
    return flat[index]


class EffectiveLRQuantiles(L.Callback):
    """Logs `eff_lr/<parameter>/q<percent>` every `every_n_steps`, and TensorBoard histograms.

    For a last layer whose effective lr has one value per coordinate or per row, it also logs
    the spread across logits: quantiles of each row's median, `eff_lr/<parameter>/rows/q<percent>`.
    """

    def __init__(self, every_n_steps: int = 50, histograms: bool = True):
        """
        Args:
            every_n_steps: Log every this many optimizer steps; 0 turns the callback off.
            histograms: Also log each tensor's distribution as a TensorBoard histogram.
        """
        if every_n_steps < 0:
            raise ValueError(f"eff_lr.every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.histograms = histograms

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or not trainer.optimizers:
            return
        names = {id(p): clean_name(n) for n, p in pl_module.model.named_parameters()}
        roles = pl_module.model.param_roles()
        metrics = {}
        for name, eff in effective_lrs(trainer.optimizers[0], names):
            for q, value in zip(QUANTILES, quantiles(eff)):
                metrics[f"eff_lr/{name}/q{round(q * 100)}"] = value
            if roles[name] == "last_layer" and eff.dim() >= 1 and eff.numel() > 1:
                rows = eff.reshape(eff.size(0), -1).median(dim=1).values
                for q, value in zip(QUANTILES, quantiles(rows)):
                    metrics[f"eff_lr/{name}/rows/q{round(q * 100)}"] = value
            if self.histograms and isinstance(pl_module.logger, TensorBoardLogger) and trainer.is_global_zero:
                pl_module.logger.experiment.add_histogram(f"eff_lr/{name}", eff.detach().float().cpu(), step - 1)
        # Straight to the loggers, at the index of the step just taken (as train/loss): Lightning's
        # self.log would repeat the cached values at later steps.
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({k: v.item() for k, v in metrics.items()}, step=step - 1)
