"""Lion: the sign of an interpolated momentum (Chen et al. 2023)."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.state import (
    BaseOptimizer,
    check_args,
    compiled,
    copy_back_,
    fusable,
    scalars,
    use_foreach,
    zeros_state,
)


def lion_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Apply one Lion step to one tensor, in place (``param`` and ``exp_avg``).

    The update is computed in ``exp_avg``'s dtype and cast back into ``param``.
    """
    grad = grad.to(exp_avg.dtype)
    update = exp_avg.lerp(grad, 1 - beta1).sign_()
    exp_avg.lerp_(grad, 1 - beta2)
    work = param.to(exp_avg.dtype)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.add_(update, alpha=-lr)
    if work is not param:
        param.copy_(work)


def lion_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """:func:`lion_update` over lists of tensors with ``torch._foreach_*`` kernels."""
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(updates)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
    work = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_add_(work, updates, alpha=-lr)
    copy_back_(params, work)


def lion_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    decay: Tensor,
) -> None:
    """:func:`lion_update` as out-of-place math, for ``torch.compile`` to fuse; ``decay = 1 - lr wd``."""
    for p, g, m in zip(params, grads, exp_avgs):
        g = g.to(m.dtype)
        update = torch.lerp(m, g, 1 - beta1).sign()
        m.copy_(torch.lerp(m, g, 1 - beta2))
        p.copy_(p.to(m.dtype) * decay - lr * update)


class Lion(BaseOptimizer):
    r"""Lion (EvoLved Sign Momentum), with decoupled weight decay.

    From "Symbolic Discovery of Optimization Algorithms" (Chen et al. 2023,
    arXiv:2302.06675), as used in "Deconstructing What Makes a Good Optimizer for
    Language Models" (Zhao et al. 2024). With gradient :math:`g_t` and momentum
    :math:`m`, each step does

    .. math::
        p &\leftarrow p \, (1 - \eta_t \lambda) \\
        p &\leftarrow p - \eta_t \, \mathrm{sign}(\beta_1 m + (1 - \beta_1) g_t) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g_t

    so the step direction interpolates with :math:`\beta_1` while the momentum is
    tracked with :math:`\beta_2`. With :math:`\beta_1 = \beta_2` it is
    :class:`~lm_opt.optim.signum.Signum`. Every coordinate moves by exactly
    :math:`\eta_t` (or 0), so useful learning rates are 3-10x smaller than Adam's
    (the study's best is 3.16e-4 against Adam's 3.16e-3).

    State: ``exp_avg`` (:math:`m`), 4 bytes per parameter in float32. The state is
    float32 even for bf16/fp16 parameters (the update is computed in float32 and
    cast back); float64 parameters keep float64 state. The update is elementwise,
    so sharded parameters (FSDP2 ``DTensor``) work as they are.

    ``fused=True`` runs the step through ``torch.compile``: one pass that reads
    :math:`p, g, m` and writes :math:`p, m`, where the eager kernels make four passes
    (on a CPU about half the time of ``torch.optim.AdamW(fused=True)``). It needs
    inductor's toolchain (a C++ compiler on CPU, Triton on CUDA), costs seconds of
    compilation on the first step (and once more for each new set of shapes), and
    agrees with the eager path up to rounding (compiled code may contract multiplies
    and adds). Groups with tensor subclasses (``DTensor``) or on several devices
    take the eager path.

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: interpolation for the update and EMA
            coefficient of the momentum.
        weight_decay: Decoupled weight decay :math:`\lambda` (multiplied by the lr).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. ``None``
            picks it when all tensors of a group are dense and on one device.
        fused: Use the compiled single-pass step (see above); ``None`` means False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_args(lr=lr, betas=betas, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach, fused=fused
        )
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        exp_avgs = zeros_state(self, params, "exp_avg")
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        if group.get("fused") and fusable(params):
            lr_t, decay = scalars(lr, 1 - lr * weight_decay)
            compiled(lion_fused)(params, grads, exp_avgs, lr=lr_t, beta1=beta1, beta2=beta2, decay=decay)
            return
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
        if use_foreach(group, params):
            lion_update_foreach(params, grads, exp_avgs, **hyper)
        else:
            for p, g, m in zip(params, grads, exp_avgs):
                lion_update(p, g, m, **hyper)
