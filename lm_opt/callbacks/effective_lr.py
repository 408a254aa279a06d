"""Quantiles of the effective per-coordinate learning rate, read from optimizer state.

The effective lr of a coordinate is `lr_t / (sqrt(v_hat_t) + eps)`: the step size an
adaptive method really takes per unit of momentum. The study plots its quantiles per layer
over training; for Adalayer it is one value per block (per logit in the last layer). These
quantiles are lm_opt's own definition of that figure: the study's public code logs the min,
max, mean and norm of the raw second moment `exp_avg_sq` instead.

An optimizer has one if it defines `effective_lr(p)` (lm_opt's do where the figure means
something), or, for an optimizer from outside lm_opt, if its state holds an Adam-style second
moment (`second_moment_effective_lr`). Any other gets a one-line notice; the update-size
diagnostic (`lm_opt.callbacks.update_size`) pictures its steps instead.

Everything is computed where the optimizer state lives (the GPU): the sorts for the quantiles
and the histogram counts. Only the few numbers that are logged are copied to the host, in one
transfer per logging event.
"""

from collections.abc import Iterator
from numbers import Real

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.tensor import DTensor

from lm_opt.callbacks.optimizer import clean_name
from lm_opt.errors import UserError
from lm_opt.optim.composite import CompositeOptimizer

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def step_count(state: dict, group: dict) -> float | None:
    """The optimizer's step counter t: in the state (torch, as a tensor) or in the param group
    (pytorch-optimizer, as an int); None if it keeps neither."""
    step = state.get("step", group.get("step"))
    return None if step is None else float(step)


def is_adam_like(state: dict, group: dict, p: torch.Tensor) -> bool:
    """Whether `p`'s state holds an Adam-style second moment: `exp_avg_sq` shaped like `p`, with
    `lr`, `betas` (beta2 second) and a numeric `eps` in its group. A group holding `d`, the
    distance estimate of D-Adaptation and Prodigy, scales both lr and `exp_avg_sq` by it: excluded."""
    v = state.get("exp_avg_sq")
    betas = group.get("betas")
    return (isinstance(v, torch.Tensor) and v.shape == p.shape and "lr" in group and "d" not in group
            and isinstance(group.get("eps"), Real) and isinstance(betas, (tuple, list)) and len(betas) >= 2)


def second_moment_effective_lr(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> torch.Tensor | None:
    """`lr / (sqrt(v / (1 - beta2^t)) + eps)` from any optimizer with an Adam-style second moment.

    `v` is `exp_avg_sq` (`max_exp_avg_sq` under `amsgrad` or `ams_bound`); the bias correction is
    left out where the group says `bias_correction: False`. Where the figure is exact, i.e. the
    optimizer's step is `-effective_lr * m` for its (bias-corrected) first moment `m`, as
    tests/callbacks/test_effective_lr_anywhere.py checks with beta1 = 0:

    - torch Adam and AdamW (amsgrad too), and NAdam, whose `m` mixes gradient and momentum;
    - pytorch-optimizer's AdEMAMix, whose `m` is `m_fast / (1 - beta1^t) + alpha m_slow`, and Yogi
      (whose v is updated differently, and used as Adam's).

    Where it is an approximation:

    - RAdam (torch's): the step is `r_t lr sqrt(1 - beta2^t) / (sqrt(v) + eps)`, the figure times
      the rectification `r_t < 1` (0.98 at t = 100 for the study's beta2 = 0.95; 0.22 at t = 100 and
      0.65 at t = 1000 for 0.999), eps added before the bias correction; while `rho_t <= 5` the
      step is plain momentum at `lr`;
    - optimizers that rescale the Adam step: AdaMod and AdaBound (bounds), Lamb (trust ratio),
      StableAdamW (update RMS clipping), QHAdam (nu), PAdam (a partial power of v), SOAP (v in its
      eigenbasis), Adan (its `exp_avg_sq` decays with betas[2], not betas[1]);
    - LaProp divides the gradient by its denominator before the momentum: the figure scales the
      newest gradient's share of the step only;
    - optimizers that do not bias-correct or lag v: ADOPT divides by the previous step's v,
      unbias-corrected, and clips.

    Returns:
        The tensor, or None where `p`'s state is not Adam-like or no step has been taken.
    """
    state = optimizer.state.get(p)
    if not state or not is_adam_like(state, group, p):
        return None
    step = step_count(state, group)
    if not step:
        return None
    amsgrad = (group.get("amsgrad") or group.get("ams_bound")) and "max_exp_avg_sq" in state
    v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
    v = v.to(torch.promote_types(v.dtype, torch.float32))  # bf16 states in float32, float64 kept
    if group.get("bias_correction", True):
        v = v / (1 - group["betas"][1] ** step)
    return group["lr"] / (v.sqrt() + group["eps"])


def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The routes' optimizers behind a CompositeOptimizer, or the optimizer itself."""
    return optimizer.optimizers if isinstance(optimizer, CompositeOptimizer) else [optimizer]


def optimizer_effective_lrs(opt: torch.optim.Optimizer, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, effective lr tensor) for the parameters of one (not composite) optimizer.
    lm_opt's optimizers say by `effective_lr` alone whether they have one: Shampoo's `exp_avg_sq`
    is its grafting Adam's, not the size of its steps."""
    generic = not type(opt).__module__.startswith("lm_opt.")
    for group in opt.param_groups:
        for p in group["params"]:
            if hasattr(opt, "effective_lr"):
                eff = opt.effective_lr(p)
            else:
                eff = second_moment_effective_lr(opt, group, p) if generic else None
            if eff is not None:
                yield names[id(p)], eff


def effective_lrs(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, effective lr tensor) for every parameter whose optimizer defines one."""
    for opt in inner_optimizers(optimizer):
        yield from optimizer_effective_lrs(opt, names)


def without_effective_lr_notice(opt: torch.optim.Optimizer) -> str:
    """The line that says an optimizer gets no eff_lr tags, and what pictures its steps instead."""
    routes = sorted({g["route"] for g in opt.param_groups if "route" in g})
    where = f"route {routes[0]!r}: " if len(routes) == 1 else ""
    return (f"eff_lr: {where}{type(opt).__module__}.{type(opt).__qualname__} exposes no effective lr (no "
            "effective_lr method, no Adam-style exp_avg_sq in its state); the update-size diagnostic "
            "(update/<parameter>/..., update_size.every_n_steps) covers its steps")


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
    that follow see the same state and are skipped. Under FSDP2 each tensor's effective lr is
    gathered from its shards to rank 0 (every rank takes part) before its quantiles are taken.
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
        self.noticed: set[str] = set()

    def effective_lrs(self, optimizer: torch.optim.Optimizer, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
        """`effective_lrs`, saying once per optimizer class and route which of them has none."""
        for opt in inner_optimizers(optimizer):
            found = False
            for name, eff in optimizer_effective_lrs(opt, names):
                found = True
                yield name, eff
            notice = without_effective_lr_notice(opt)
            if not found and notice not in self.noticed:
                self.noticed.add(notice)
                rank_zero_info(notice)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step % self.every_n_steps or step == self.logged_step or not trainer.optimizers:
            return
        named = list(pl_module.model.named_parameters())
        sharded = any(isinstance(p, DTensor) for _, p in named)
        if not (trainer.is_global_zero or sharded):
            return
        self.logged_step = step
        names = {id(p): clean_name(n) for n, p in named}
        roles = pl_module.model.param_roles()
        tags, values, histograms = [], [], {}
        for name, eff in self.effective_lrs(trainer.optimizers[0], names):
            if isinstance(eff, DTensor):  # FSDP2: every rank sends its shard; rank 0 takes the quantiles
                eff = eff.full_tensor()
            if not trainer.is_global_zero:
                continue
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
