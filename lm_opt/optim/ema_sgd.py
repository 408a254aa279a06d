"""SGD with bias-corrected EMA momentum: Adam with the second moment fixed at 1."""

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


def ema_sgd_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_correction: float,
) -> None:
    """One step on one tensor, in place: ``m = b m + (1 - b) g``, ``p = p (1 - lr wd) - lr m / bc``.

    The update is computed in ``exp_avg``'s dtype and cast back into ``param``.
    """
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - momentum)
    work = param.to(exp_avg.dtype)
    if weight_decay:
        work.mul_(1 - lr * weight_decay)
    work.add_(exp_avg, alpha=-lr / bias_correction)
    if work is not param:
        param.copy_(work)


def ema_sgd_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    bias_correction: float,
) -> None:
    """:func:`ema_sgd_update` over lists of tensors with ``torch._foreach_*`` kernels."""
    torch._foreach_lerp_(exp_avgs, [g.to(m.dtype) for g, m in zip(grads, exp_avgs)], 1 - momentum)
    work = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_add_(work, exp_avgs, alpha=-lr / bias_correction)
    copy_back_(params, work)


def ema_sgd_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    momentum: float,
    decay: Tensor,
    step_size: Tensor,
) -> None:
    """:func:`ema_sgd_update` as out-of-place math for ``torch.compile``; ``decay = 1 - lr wd``,
    ``step_size = lr / bias_correction``."""
    for p, g, m in zip(params, grads, exp_avgs):
        m_new = torch.lerp(m, g.to(m.dtype), 1 - momentum)
        m.copy_(m_new)
        p.copy_(p.to(m.dtype) * decay - step_size * m_new)


class EMASGD(BaseOptimizer):
    r"""SGD with Adam's bias-corrected EMA momentum, i.e. Adam with :math:`v` fixed at 1.

    The body optimizer of "SGD + Adalayer on the last layer and LayerNorm" in
    "Deconstructing What Makes a Good Optimizer for Language Models" (Zhao et al. 2024,
    arXiv:2407.07972). With gradient :math:`g_t` at step :math:`t`:

    .. math::
        m &\leftarrow \beta m + (1 - \beta) g_t \\
        p &\leftarrow p \, (1 - \eta_t \lambda) - \eta_t \, m / (1 - \beta^t)

    Unlike ``torch.optim.SGD(momentum=b, dampening=b)``, whose buffer starts at
    :math:`g_1`, every step is the bias-corrected EMA, so the lr is on the scale of
    Adam's update for unit-scale gradients.

    State: ``step`` (an int) and ``exp_avg`` (:math:`m`), 4 bytes per parameter in
    float32. The state is float32 even for bf16/fp16 parameters (the update is computed
    in float32 and cast back); float64 parameters keep float64 state. The update is
    elementwise, so sharded parameters (FSDP2 ``DTensor``) work as they are.

    ``fused=True`` compiles the step into one pass over :math:`p, g, m`, as
    :class:`~lm_opt.optim.lion.Lion` does (same requirements and caveats).

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        momentum: EMA coefficient :math:`\beta` of the momentum.
        weight_decay: Decoupled weight decay :math:`\lambda` (multiplied by the lr).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. ``None``
            picks it when all tensors of a group are on one device.
        fused: Use the compiled single-pass step; ``None`` means False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
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
        zeros_state(self, params, "exp_avg")
        # A parameter that skipped steps (grad None) has its own bias correction.
        by_step: dict[int, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            by_step.setdefault(state["step"], []).append(p)
        foreach = use_foreach(group, params)
        fused = group.get("fused") and fusable(params)
        for t, same_step in by_step.items():
            hyper = dict(
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                bias_correction=1 - group["momentum"] ** t,
            )
            grads = [p.grad for p in same_step]
            exp_avgs = [self.state[p]["exp_avg"] for p in same_step]
            if fused:
                decay, step_size = scalars(
                    1 - hyper["lr"] * hyper["weight_decay"], hyper["lr"] / hyper["bias_correction"]
                )
                compiled(ema_sgd_fused)(
                    same_step, grads, exp_avgs, momentum=hyper["momentum"], decay=decay, step_size=step_size
                )
            elif foreach:
                ema_sgd_update_foreach(same_step, grads, exp_avgs, **hyper)
            else:
                for p, g, m in zip(same_step, grads, exp_avgs):
                    ema_sgd_update(p, g, m, **hyper)
