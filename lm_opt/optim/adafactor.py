"""Adafactor*: Adam with a factored second moment (Zhao et al. 2024's variant)."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.state import (
    BaseOptimizer,
    check_args,
    copy_back_,
    group_of,
    state_dtype,
    use_foreach,
)


def factored_second_moment(row: Tensor, col: Tensor) -> Tensor:
    """Rebuild the second moment ``outer(R, C) / mean(R)`` over the last two dims.

    Args:
        row: ``R``, shape ``(*batch, n_rows)``: means of g^2 over each row.
        col: ``C``, shape ``(*batch, n_cols)``: means of g^2 over each column.

    Returns:
        Shape ``(*batch, n_rows, n_cols)``; exact when g^2 has rank one.
    """
    row_mean = row.mean(dim=-1, keepdim=True)
    # R >= 0, so mean(R) == 0 only when R == 0 (every gradient so far was zero): take
    # 0/0 as 0 rather than NaN, so such a tensor gets a zero update.
    scaled_row = row / row_mean.clamp_min(torch.finfo(row.dtype).tiny)
    return scaled_row.unsqueeze(-1) * col.unsqueeze(-2)


def factored_denominator(
    row: Tensor, col: Tensor, bias_correction2: float, eps: float, out: Tensor | None = None
) -> Tensor:
    """``sqrt(factored_second_moment(row, col) / bias_correction2) + eps``, in ``out`` if given.

    ``sqrt(R_i C_j) = sqrt(R_i) sqrt(C_j)``: the square roots are taken of the factors, so
    the only full-size tensor is the result (two passes over it instead of four).
    """
    row_mean = row.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    sqrt_row = row.div(row_mean.mul_(bias_correction2)).sqrt_()
    return torch.mul(sqrt_row.unsqueeze(-1), col.sqrt().unsqueeze(-2), out=out).add_(eps)


def _accumulate_second_moment(
    grad: Tensor, state: dict[str, Tensor], beta2: float
) -> Tensor | None:
    """Take ``grad`` into the second moment.

    Returns:
        The ``grad**2`` scratch tensor of a factored moment, for :func:`_denominator` to
        reuse as its output, or None for a full ``v``.
    """
    if "exp_avg_sq" in state:
        v = state["exp_avg_sq"]
        if v.ndim == 0 and grad.ndim > 0:  # one scalar for the whole vector: the mean of g^2
            v.mul_(beta2).add_(grad.square().mean(), alpha=1 - beta2)
        else:
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return None
    grad_sq = grad.square()
    state["exp_avg_sq_row"].mul_(beta2).add_(grad_sq.mean(dim=-1), alpha=1 - beta2)
    state["exp_avg_sq_col"].mul_(beta2).add_(grad_sq.mean(dim=-2), alpha=1 - beta2)
    return grad_sq


def _denominator(
    state: dict[str, Tensor], beta2: float, eps: float, out: Tensor | None = None
) -> Tensor:
    """``sqrt(v / (1 - beta2^t)) + eps``; a factored ``v``'s is written into ``out`` if given."""
    bias_correction2 = 1 - beta2 ** state["step"].item()
    if "exp_avg_sq" in state:
        denom = state["exp_avg_sq"].div(bias_correction2).sqrt_().add_(eps)
        return denom.expand_as(state["exp_avg"])
    return factored_denominator(
        state["exp_avg_sq_row"], state["exp_avg_sq_col"], bias_correction2, eps, out=out
    )


def _init_state(param: Tensor, state: dict[str, Tensor], vector_moment: str) -> None:
    dtype = state_dtype(param)
    # On the CPU, as torch.optim keeps it: reading it for bias correction costs no sync.
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    if param.ndim >= 2:
        state["exp_avg_sq_row"] = param.new_zeros(param.shape[:-1], dtype=dtype)
        state["exp_avg_sq_col"] = param.new_zeros(param.shape[:-2] + param.shape[-1:], dtype=dtype)
    elif vector_moment == "scalar":
        state["exp_avg_sq"] = param.new_zeros((), dtype=dtype)
    else:
        state["exp_avg_sq"] = torch.zeros_like(
            param, dtype=dtype, memory_format=torch.preserve_format
        )


def adafactor_update(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Apply one Adafactor* step to one tensor, in place (``param`` and ``state``).

    The update is computed in the state's dtype and cast back into ``param``.
    """
    exp_avg = state["exp_avg"]
    grad = grad.to(exp_avg.dtype)
    state["step"] += 1
    exp_avg.lerp_(grad, 1 - beta1)
    denom = _denominator(state, beta2, eps, out=_accumulate_second_moment(grad, state, beta2))
    work = param.to(exp_avg.dtype)
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** state["step"].item()))
    if work is not param:
        param.copy_(work)


def adafactor_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """:func:`adafactor_update` over lists of tensors.

    The elementwise parts (first moment, weight decay, the final division) use
    ``torch._foreach_*`` kernels; the second moment needs per-tensor reductions.
    Like torch's foreach Adam, it holds the denominators of the whole group at once.
    """
    exp_avgs = [s["exp_avg"] for s in states]
    grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_add_([s["step"] for s in states], 1)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    denoms, step_sizes = [], []
    for grad, state in zip(grads, states):
        scratch = _accumulate_second_moment(grad, state, beta2)
        denoms.append(_denominator(state, beta2, eps, out=scratch))
        step_sizes.append(-lr / (1 - beta1 ** state["step"].item()))
    work = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay != 0:
        torch._foreach_mul_(work, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(work, exp_avgs, denoms, step_sizes)
    copy_back_(params, work)


class Adafactor(BaseOptimizer):
    r"""Adafactor* of Zhao et al. 2024: Adam's first moment, factored second moment.

    From "Deconstructing What Makes a Good Optimizer for Language Models" (Zhao et
    al. 2024, arXiv:2407.07972), a stripped-down Adafactor ("Adafactor: Adaptive
    Learning Rates with Sublinear Memory Cost", Shazeer & Stern 2018): no update
    clipping, no relative step size, no :math:`\beta_2` schedule. For a matrix with
    gradient :math:`G_t` (tensors with more dims are factored over their last two,
    the leading dims being batch dims), each step does

    .. math::
        m &\leftarrow \beta_1 m + (1 - \beta_1) G_t \\
        R &\leftarrow \beta_2 R + (1 - \beta_2) \operatorname{mean}_j G_t^2
            \quad \text{(one per row)} \\
        C &\leftarrow \beta_2 C + (1 - \beta_2) \operatorname{mean}_i G_t^2
            \quad \text{(one per column)} \\
        V &= R C^\top / \operatorname{mean}(R) \\
        p &\leftarrow p \, (1 - \eta_t \lambda)
            - \eta_t \, \frac{m / (1 - \beta_1^t)}{\sqrt{V / (1 - \beta_2^t)} + \epsilon}

    A vector (a LayerNorm gain) gets one scalar second moment, as in the study's code:
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) \operatorname{mean}_i g_{t,i}^2` in place of
    :math:`V` (``vector_moment="scalar"``); ``vector_moment="full"`` keeps Adam's
    per-coordinate :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g_t^2` instead.

    State: ``step``; ``exp_avg`` (:math:`m`); ``exp_avg_sq_row`` (:math:`R`) and
    ``exp_avg_sq_col`` (:math:`C`) for tensors with two or more dims, else
    ``exp_avg_sq`` (:math:`v`: a 0-dim tensor, or per coordinate with ``"full"``). In
    float32 that is about 4 bytes per parameter (plus 4 bytes per row and per column, or 4
    more per coordinate of a vector with ``"full"``). The state is
    float32 even for bf16/fp16 parameters (the update is computed in float32 and
    cast back); float64 parameters keep float64 state.

    The row and column means are statistics of the whole tensor, so parameters
    sharded as ``DTensor`` (FSDP2) are refused with a ``RuntimeError`` naming
    Adafactor, at construction (or ``add_param_group``).

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: EMA coefficients of the first and second
            moments.
        eps: Added to the square root of the second moment (1e-15 in the study).
        weight_decay: Decoupled weight decay :math:`\lambda` (multiplied by the lr).
        vector_moment: ``"scalar"`` (the study's): one second moment per vector;
            ``"full"``: one per coordinate, as Adam.
        foreach: Use ``torch._foreach_*`` kernels for the elementwise parts. ``None``
            picks them when all tensors of a group are dense and on one device.
    """

    sharding_reason = "its row and column means of g^2 span the whole tensor"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-15,
        weight_decay: float = 0.0,
        *,
        vector_moment: str = "scalar",
        foreach: bool | None = None,
    ) -> None:
        check_args(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if vector_moment not in ("scalar", "full"):
            raise ValueError(f"Invalid vector_moment: {vector_moment!r} (must be 'scalar' or 'full')")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            vector_moment=vector_moment, foreach=foreach,
        )
        super().__init__(params, defaults)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                _init_state(p, state, group["vector_moment"])
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        if use_foreach(group, params):
            adafactor_update_foreach(params, grads, states, **hyper)
        else:
            for p, g, state in zip(params, grads, states):
                adafactor_update(p, g, state, **hyper)

    def effective_lr(self, p: Tensor) -> Tensor | None:
        """Per-coordinate ``lr / (sqrt(v_hat) + eps)`` from the current state.

        ``v_hat`` is the (reconstructed) second moment over ``1 - beta2^t``, so the
        last step moved ``p`` by ``-effective_lr * exp_avg / (1 - beta1^t)`` (plus
        weight decay) if ``lr`` has not changed since.

        Returns:
            A tensor shaped like ``p`` in the state's dtype, or None before ``p``'s
            first step.
        """
        state = self.state.get(p)
        if not state:
            return None
        group = group_of(self, p)
        return group["lr"] / _denominator(state, group["betas"][1], group["eps"])
