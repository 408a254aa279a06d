"""Signum: the sign of an EMA momentum (Bernstein et al. 2018)."""

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def _state_dtype(param: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 parameters, the parameter's own dtype otherwise."""
    return torch.promote_types(param.dtype, torch.float32)


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
    exp_avg.mul_(momentum).add_(grad.to(exp_avg.dtype), alpha=1 - momentum)
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
    torch._foreach_mul_(exp_avgs, momentum)
    torch._foreach_add_(
        exp_avgs, [g.to(m.dtype) for g, m in zip(grads, exp_avgs)], alpha=1 - momentum
    )
    work = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_add_(work, torch._foreach_sign(exp_avgs), alpha=-lr)
    for p, w in zip(params, work):
        if w is not p:
            p.copy_(w)


class Signum(Optimizer):
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

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        momentum: EMA coefficient :math:`\beta` of the momentum.
        weight_decay: Decoupled weight decay :math:`\lambda` (multiplied by the lr).
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. ``None``
            picks it when all tensors of a group are dense and on one device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Signum does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=_state_dtype(p), memory_format=torch.preserve_format
                    )
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue

            hyper = dict(
                lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"]
            )
            foreach = group["foreach"]
            if foreach is None:
                foreach = len({p.device for p in params}) == 1
            if foreach:
                signum_update_foreach(params, grads, exp_avgs, **hyper)
            else:
                for p, g, m in zip(params, grads, exp_avgs):
                    signum_update(p, g, m, **hyper)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping float32 state for bf16/fp16 parameters.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point state to the
        parameter's dtype, which would round float32 momentum to bf16; the saved
        tensors are re-read here in the dtype the optimizer keeps.
        """
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for param_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if torch.is_tensor(value) and key != "step":
                    self.state[p][key] = value.to(device=p.device, dtype=_state_dtype(p))
