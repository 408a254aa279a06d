"""Signum: the sign of an EMA momentum (Bernstein et al. 2018)."""

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


def signum_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """Apply one Signum step to one tensor, in place (``param`` and ``exp_avg``).

    The update is computed in ``exp_avg``'s dtype and cast back into ``param``.
    """
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - momentum)
    work = param.to(exp_avg.dtype)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.add_(exp_avg.sign(), alpha=-lr)
    if work is not param:
        param.copy_(work)


def signum_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """:func:`signum_update` over lists of tensors with ``torch._foreach_*`` kernels."""
    torch._foreach_lerp_(exp_avgs, [g.to(m.dtype) for g, m in zip(grads, exp_avgs)], 1 - momentum)
    work = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_add_(work, torch._foreach_sign(exp_avgs), alpha=-lr)
    copy_back_(params, work)


def signum_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: Tensor,
    momentum: float,
    decay: Tensor,
) -> None:
    """:func:`signum_update` as out-of-place math, for ``torch.compile`` to fuse; ``decay = 1 - lr wd``."""
    for p, g, m in zip(params, grads, exp_avgs):
        m_new = torch.lerp(m, g.to(m.dtype), 1 - momentum)
        m.copy_(m_new)
        p.copy_(p.to(m.dtype) * decay - lr * m_new.sign())


class Signum(BaseOptimizer):
    r"""Signum: sign descent on an EMA momentum, with decoupled weight decay.

    From "signSGD: Compressed Optimisation for Non-Convex Problems" (Bernstein et
    al. 2018, arXiv:1802.04434), as used in "Deconstructing What Makes a Good
    Optimizer for Language Models" (Zhao et al. 2024), where it recovers most of
    Adam's performance. With gradient :math:`g_t`, each step does

    .. math::
        m &\leftarrow \beta m + (1 - \beta) g_t \\
        p &\leftarrow p \, (1 - \eta_t \lambda) - \eta_t \, \mathrm{sign}(m)

    i.e. the sign of the *updated* momentum, with no eps and no bias correction
    (the sign does not see the scale). It equals :class:`~lm_opt.optim.lion.Lion`
    with :math:`\beta_1 = \beta_2 = \beta`: Lion's interpolated direction is then
    the updated momentum itself, so Signum saves Lion's extra temporary.
    ``momentum=0`` is plain signSGD.

    State: ``exp_avg`` (:math:`m`), 4 bytes per parameter in float32. The state is
    float32 even for bf16/fp16 parameters (the update is computed in float32 and
    cast back); float64 parameters keep float64 state. The update is elementwise,
    so sharded parameters (FSDP2 ``DTensor``) work as they are.

    ``fused=True`` compiles the step into one pass over :math:`p, g, m`, as
    :class:`~lm_opt.optim.lion.Lion` does (same requirements and caveats).

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        momentum: EMA coefficient :math:`\beta` of the momentum.
        weight_decay: Decoupled weight decay :math:`\lambda` (multiplied by the lr).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. ``None``
            picks it when all tensors of a group are dense and on one device.
        fused: Use the compiled single-pass step; ``None`` means False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_args(lr=lr, momentum=momentum, weight_decay=weight_decay)
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, fused=fused
        )
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        exp_avgs = zeros_state(self, params, "exp_avg")
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if group.get("fused") and fusable(params):
            lr_t, decay = scalars(lr, 1 - lr * weight_decay)
            compiled(signum_fused)(params, grads, exp_avgs, lr=lr_t, momentum=momentum, decay=decay)
            return
        hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if use_foreach(group, params):
            signum_update_foreach(params, grads, exp_avgs, **hyper)
        else:
            for p, g, m in zip(params, grads, exp_avgs):
                signum_update(p, g, m, **hyper)
