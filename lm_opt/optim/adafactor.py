"""Adafactor*: Adam with a factored second moment (Zhao et al. 2024's variant)."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.sharded import all_reduce_sums, is_dtensor, local, rows_like
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
    row: Tensor,
    col: Tensor,
    bias_correction2: float,
    eps: float,
    out: Tensor | None = None,
    row_mean: Tensor | None = None,
) -> Tensor:
    """``sqrt(factored_second_moment(row, col) / bias_correction2) + eps``, in ``out`` if given.

    ``sqrt(R_i C_j) = sqrt(R_i) sqrt(C_j)``: the square roots are taken of the factors, so
    the only full-size tensor is the result (two passes over it instead of four).
    ``row_mean``, ``mean(R)`` over the last dim, is given where ``row`` is a shard of ``R``.
    """
    if row_mean is None:
        row_mean = row.mean(dim=-1, keepdim=True)
    row_mean = row_mean.clamp_min(torch.finfo(row.dtype).tiny)
    sqrt_row = row.div(row_mean.mul_(bias_correction2)).sqrt_()
    return torch.mul(sqrt_row.unsqueeze(-1), col.sqrt().unsqueeze(-2), out=out).add_(eps)


def _shard_sums(grad: Tensor, state: dict[str, Tensor]) -> Tensor | None:
    """The sums of g^2 over this shard's rows that a dim-0 shard of a tensor lacks.

    Per column of a matrix (for ``C``), over all of a vector with a scalar ``v``. None where
    the statistics are local: ``R`` averages whole rows, the dim 0 of a 3+-D tensor is a
    batch dim of its factoring, and a per-coordinate ``v`` is elementwise.
    """
    if grad.ndim == 2:
        return torch.linalg.vector_norm(grad, dim=0).square_()
    if grad.ndim == 1 and state["exp_avg_sq"].ndim == 0:
        return torch.linalg.vector_norm(grad).square_()
    return None


def _accumulate_second_moment(
    grad: Tensor, state: dict[str, Tensor], beta2: float, shared_mean: Tensor | None = None
) -> Tensor | None:
    """Take ``grad`` into the second moment.

    ``shared_mean`` is given where ``grad`` is a dim-0 shard: the mean of g^2 over the whole
    tensor's rows that :func:`_shard_sums` leads to (per column, or of the vector).

    Returns:
        The ``grad**2`` scratch tensor of a factored moment, for :func:`_denominator` to
        reuse as its output, or None for a full ``v``.
    """
    if "exp_avg_sq" in state:
        v = state["exp_avg_sq"]
        if v.ndim == 0 and grad.ndim > 0:  # one scalar for the whole vector: the mean of g^2
            mean = grad.square().mean() if shared_mean is None else shared_mean
            v.mul_(beta2).add_(mean, alpha=1 - beta2)
        else:
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return None
    grad_sq = grad.square()
    col_mean = grad_sq.mean(dim=-2) if shared_mean is None else shared_mean
    state["exp_avg_sq_row"].mul_(beta2).add_(grad_sq.mean(dim=-1), alpha=1 - beta2)
    state["exp_avg_sq_col"].mul_(beta2).add_(col_mean, alpha=1 - beta2)
    return grad_sq


def _denominator(
    state: dict[str, Tensor],
    beta2: float,
    eps: float,
    out: Tensor | None = None,
    sharded_rows: bool = False,
) -> Tensor:
    """``sqrt(v / (1 - beta2^t)) + eps``; a factored ``v``'s is written into ``out`` if given.

    ``sharded_rows``: ``R`` is a shard of a matrix's rows, so ``mean(R)`` is taken as
    ``mean(C)``, the same number in exact arithmetic (both are EMAs of the mean of g^2, from
    zero), which every rank holds whole.
    """
    bias_correction2 = 1 - beta2 ** state["step"].item()
    if "exp_avg_sq" in state:
        denom = state["exp_avg_sq"].div(bias_correction2).sqrt_().add_(eps)
        return denom.expand_as(state["exp_avg"])
    col = state["exp_avg_sq_col"]
    row_mean = col.mean(dim=-1, keepdim=True) if sharded_rows else None
    return factored_denominator(
        state["exp_avg_sq_row"], col, bias_correction2, eps, out=out, row_mean=row_mean
    )


def _init_state(param: Tensor, state: dict[str, Tensor], vector_moment: str) -> None:
    """Zero state; for a dim-0 shard, the tensors indexed by its rows are sharded like it."""
    dtype = state_dtype(param)
    shard = local(param)
    # On the CPU, as torch.optim keeps it: reading it for bias correction costs no sync.
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    exp_avg = torch.zeros_like(shard, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg"] = rows_like(param, exp_avg)
    if param.ndim >= 2:
        state["exp_avg_sq_row"] = rows_like(param, shard.new_zeros(shard.shape[:-1], dtype=dtype))
        # A matrix's C spans its rows: every rank holds all of it.
        col = shard.new_zeros(shard.shape[:-2] + shard.shape[-1:], dtype=dtype)
        state["exp_avg_sq_col"] = col if param.ndim == 2 else rows_like(param, col)
    elif vector_moment == "scalar":
        state["exp_avg_sq"] = shard.new_zeros((), dtype=dtype)
    else:
        state["exp_avg_sq"] = rows_like(param, torch.zeros_like(exp_avg))


def _local_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with this rank's shards of its ``DTensor`` entries (views: updates go through)."""
    return {key: local(value) for key, value in state.items()}


def _shared_means(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]]
) -> list[Tensor | None]:
    """For each dim-0 shard among ``params`` that lacks some rows' statistics, the mean of g^2
    over the whole tensor's rows that :func:`_accumulate_second_moment` takes; else None.

    ``grads`` and ``states`` are the local ones. One all-reduce of the shards' partial sums
    (:func:`_shard_sums`) per process group.
    """
    sharded, partials = [], []
    for i, (p, g, state) in enumerate(zip(params, grads, states)):
        sums = _shard_sums(g.to(state["exp_avg"].dtype), state) if is_dtensor(p) else None
        if sums is not None:
            sharded.append(i)
            partials.append(sums)
    means: list[Tensor | None] = [None] * len(params)
    totals = all_reduce_sums([params[i] for i in sharded], partials)
    for i, total in zip(sharded, totals):
        means[i] = total / (params[i].shape[0] if params[i].ndim == 2 else params[i].numel())
    return means


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
    shared_mean: Tensor | None = None,
) -> None:
    """Apply one Adafactor* step to one tensor, in place (``param`` and ``state``).

    The update is computed in the state's dtype and cast back into ``param``. For a dim-0
    shard (local tensors, :func:`_local_state`), ``shared_mean`` is its entry of
    :func:`_shared_means`.
    """
    exp_avg = state["exp_avg"]
    grad = grad.to(exp_avg.dtype)
    state["step"] += 1
    exp_avg.lerp_(grad, 1 - beta1)
    scratch = _accumulate_second_moment(grad, state, beta2, shared_mean)
    sharded_rows = shared_mean is not None and grad.ndim == 2
    denom = _denominator(state, beta2, eps, out=scratch, sharded_rows=sharded_rows)
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
    shared_means: list[Tensor | None] | None = None,
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
    for grad, state, shared_mean in zip(grads, states, shared_means or [None] * len(grads)):
        scratch = _accumulate_second_moment(grad, state, beta2, shared_mean)
        sharded_rows = shared_mean is not None and grad.ndim == 2
        denoms.append(_denominator(state, beta2, eps, out=scratch, sharded_rows=sharded_rows))
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

    Under FSDP2 (parameters sharded on dim 0 as ``DTensor``, :mod:`lm_opt.optim.sharded`) the
    step is that of one process, up to float32 summation order. A rank holds whole rows of an
    :math:`r \times c` matrix, so :math:`R` on its rows is local; each rank sums g^2 over its
    rows per column, and one all-reduce per param group adds up the :math:`c` sums that give
    :math:`C`, which every rank keeps whole. :math:`\operatorname{mean}(R)` is taken as
    :math:`\operatorname{mean}(C)`: both are EMAs of :math:`\operatorname{mean} G_t^2`, so they
    are equal. A vector's scalar :math:`v` takes 1 all-reduced sum; a ``"full"`` :math:`v` and
    tensors of 3+ dims (dim 0 is a batch dim of their factoring) take none. Communication per
    step: :math:`c` floats per matrix and 1 per vector, in one all-reduce per param group.
    Memory per rank of :math:`W`: :math:`m` and :math:`R` (and a ``"full"`` :math:`v`) on the
    rank's :math:`\lceil r / W \rceil` rows at most, :math:`C` and scalar :math:`v` whole
    (:math:`c` and 1 floats); the state dict holds those shards as ``DTensor`` like the
    parameter, and :math:`C` and scalars as plain tensors equal on all ranks.

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

    sharding_scheme = "column statistics: all-reduce of c floats per r x c matrix, 1 per vector"

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
        for p in params:
            if not self.state[p]:
                _init_state(p, self.state[p], group["vector_moment"])
        states = [_local_state(self.state[p]) for p in params]
        grads = [local(p.grad) for p in params]
        shared_means = _shared_means(params, grads, states)
        params = [local(p) for p in params]
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        if use_foreach(group, params):
            adafactor_update_foreach(params, grads, states, **hyper, shared_means=shared_means)
        else:
            for p, g, state, shared_mean in zip(params, grads, states, shared_means):
                adafactor_update(p, g, state, **hyper, shared_mean=shared_mean)

    def effective_lr(self, p: Tensor) -> Tensor | None:
        """Per-coordinate ``lr / (sqrt(v_hat) + eps)`` from the current state.

        ``v_hat`` is the (reconstructed) second moment over ``1 - beta2^t``, so the
        last step moved ``p`` by ``-effective_lr * exp_avg / (1 - beta1^t)`` (plus
        weight decay) if ``lr`` has not changed since.

        Returns:
            A tensor shaped (and, for a ``DTensor``, sharded) like ``p`` in the state's dtype,
            or None before ``p``'s first step.
        """
        state = self.state.get(p)
        if not state:
            return None
        group = group_of(self, p)
        sharded_rows = is_dtensor(p) and p.ndim == 2
        beta2, eps = group["betas"][1], group["eps"]
        denom = _denominator(_local_state(state), beta2, eps, sharded_rows=sharded_rows)
        return rows_like(p, group["lr"] / denom)
