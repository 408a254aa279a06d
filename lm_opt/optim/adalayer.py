"""Adalayer: Adam with one second-moment scalar per block of a parameter."""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.model import ROLES
from lm_opt.optim.sharded import all_reduce_sums, is_dtensor, local, row_offset, rows_like
from lm_opt.optim.state import (
    BaseOptimizer,
    check_args,
    compiled,
    copy_back_,
    fusable,
    group_of,
    scalars,
    state_dtype,
    use_foreach,
)


def num_blocks(shape: torch.Size, blocks: str | int) -> int:
    """Number of second-moment blocks of a parameter of ``shape`` under layout ``blocks``.

    Blocks always split dim 0 into equal, contiguous slices, so a block is a
    contiguous chunk of the flattened tensor.
    """
    if blocks == "tensor":
        return 1
    if len(shape) == 0:
        raise ValueError(f"blocks={blocks!r} splits dim 0, but the parameter is a scalar")
    if blocks == "row":
        return shape[0]
    if shape[0] % blocks:
        raise ValueError(
            f"blocks={blocks} needs dim 0 divisible by {blocks}, "
            f"got a parameter of shape {tuple(shape)}"
        )
    return blocks


def step_hparams(t: int, group: dict[str, Any]) -> dict[str, float]:
    """The scalars of step ``t`` (1-based) for a param group: lr, v's EMA weight, bias corrections.

    A ``v_weight`` of 0 leaves the second moment as it is.
    """
    beta1, beta2 = group["betas"]
    freeze_after = group["freeze_after"]
    hparams = dict(
        lr=group["lr"],
        beta1=beta1,
        v_weight=1 - beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        bias_correction1=1 - beta1**t,
        bias_correction2=1 - beta2**t,
    )
    if freeze_after is None:
        return hparams
    # Frozen Adalayer (Zhao et al. 2024) has no second-moment bias correction.
    hparams["bias_correction2"] = 1.0
    if t <= freeze_after:
        # The study's lr = 0 phase: beta2_t = 1 - 1/t makes v_T the plain mean of the T block means.
        hparams.update(lr=0.0, v_weight=1 / t)
    elif not group["keep_adapting"]:
        hparams["v_weight"] = 0.0
    return hparams


def block_mean_sq(grad: Tensor, n: int) -> Tensor:
    """Mean of ``grad**2`` over each of ``n`` contiguous blocks, without a ``grad**2`` temporary."""
    block = grad.reshape(n, -1)
    return torch.linalg.vector_norm(block, dim=1).square_().div_(block.shape[1])


def row_blocks(param: Tensor, n: int) -> Tensor | None:
    """The block of each row that this rank holds of a dim-0 sharded ``param`` in ``n`` blocks.

    Returns:
        None where each row is a block: the shard's ``exp_avg_sq`` is then its rows' entries.
    """
    if n == param.shape[0]:
        return None
    first = row_offset(param)
    rows = torch.arange(first, first + local(param).shape[0], device=param.device)
    return rows // (param.shape[0] // n)


def shard_block_means(
    params: list[Tensor], dtypes: list[torch.dtype], blocks: str | int
) -> list[Tensor]:
    """The means of g^2 over the blocks of dim-0 sharded ``params``, as :func:`block_mean_sq`
    computes them on whole tensors.

    Where each row is a block they are local (this rank's rows). Otherwise each rank adds the
    squares of its rows into its blocks' partial sums, and one all-reduce per process group
    sums those: ``n`` floats per parameter of ``n`` blocks.
    """
    means: list[Tensor | None] = []
    reduced, partials = [], []
    for i, (p, dtype) in enumerate(zip(params, dtypes)):
        n, row_numel = num_blocks(p.shape, blocks), math.prod(p.shape[1:])
        g = local(p.grad).to(dtype)
        row_sq = torch.linalg.vector_norm(g.reshape(g.shape[0], row_numel), dim=1).square_()
        index = row_blocks(p, n)
        if index is None:
            means.append(row_sq.div_(row_numel))
            continue
        means.append(None)
        reduced.append(i)
        partials.append(row_sq.new_zeros(n).index_add_(0, index, row_sq))
    for i, total in zip(reduced, all_reduce_sums([params[i] for i in reduced], partials)):
        means[i] = total.div_(params[i].numel() // total.numel())
    return means


def adalayer_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    v_weight: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    block_means: Tensor | None = None,
    row_block: Tensor | None = None,
) -> None:
    """One Adalayer step on one tensor, in place; ``exp_avg_sq`` holds one entry per block.

    For a dim-0 shard (local tensors), ``block_means`` are its entries of
    :func:`shard_block_means` and ``row_block`` the block of each local row (:func:`row_blocks`).
    """
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - beta1)
    if v_weight:
        means = block_mean_sq(g, exp_avg_sq.numel()) if block_means is None else block_means
        exp_avg_sq.lerp_(means, v_weight)
    if lr == 0.0 or not param.numel():  # frozen Adalayer's warm-up, or an empty shard
        return
    denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
    if row_block is not None:
        denom = denom[row_block]
    n = denom.numel()
    p = param.to(exp_avg.dtype).contiguous()  # a copy only for bf16 or strided parameters
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    # One scalar per block, broadcast along its row of the (n, -1) view: no full-size temporary.
    p.view(n, -1).addcdiv_(exp_avg.view(n, -1), denom[:, None], value=-lr / bias_correction1)
    if p is not param:
        param.copy_(p)


def adalayer_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    v_weight: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    block_means: list[Tensor | None] | None = None,
    row_blocks: list[Tensor | None] | None = None,
) -> None:
    """:func:`adalayer_update` on many tensors (``block_means`` and ``row_blocks`` per tensor).

    The momentum, the second moments and weight decay use ``torch._foreach_*`` kernels; the
    block reductions and the broadcast division run per tensor.
    """
    block_means = block_means or [None] * len(params)
    row_blocks = row_blocks or [None] * len(params)
    gs = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    if v_weight:
        means = [
            block_mean_sq(g, v.numel()) if b is None else b
            for g, v, b in zip(gs, exp_avg_sqs, block_means)
        ]
        torch._foreach_lerp_(exp_avg_sqs, means, v_weight)
    if lr == 0.0:
        return
    denoms = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    ps = [p.to(m.dtype).contiguous() for p, m in zip(params, exp_avgs)]
    if weight_decay:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    for p, m, d, index in zip(ps, exp_avgs, denoms, row_blocks):
        if not p.numel():  # an empty shard
            continue
        d = d if index is None else d[index]
        n = d.numel()
        p.view(n, -1).addcdiv_(m.view(n, -1), d[:, None], value=-lr / bias_correction1)
    copy_back_(params, ps)


def adalayer_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    beta1: float,
    eps: float,
    v_weight: Tensor,
    bias_correction2: Tensor,
    decay: Tensor,
    step_size: Tensor,
) -> None:
    """:func:`adalayer_update` as out-of-place math for ``torch.compile``: a block reduction
    and one pass over ``p, g, m``. ``decay = 1 - lr wd``, ``step_size = lr / bias_correction1``;
    a ``v_weight`` of 0 leaves ``v`` as it is."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        n = v.numel()
        g = g.to(m.dtype)
        m_new = torch.lerp(m, g, 1 - beta1)
        m.copy_(m_new)
        v_new = torch.lerp(v, g.reshape(n, -1).square().mean(1), v_weight)
        v.copy_(v_new)
        denom = (v_new / bias_correction2).sqrt() + eps
        update = m_new.reshape(n, -1) / denom[:, None]
        p.copy_((p.to(m.dtype).reshape(n, -1) * decay - step_size * update).reshape(p.shape))


class Adalayer(BaseOptimizer):
    r"""Adalayer (Zhao et al. 2024, "Deconstructing What Makes a Good Optimizer for Language
    Models"): Adam's per-coordinate momentum with one second-moment scalar per block.

    For a block :math:`B` of parameter :math:`p` with gradient :math:`g_t` at step :math:`t`:

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_{B,t} = \beta_2 v_{B,t-1} + (1 - \beta_2) \operatorname{mean}_{i \in B} g_{t,i}^2,

        p_i \leftarrow p_i (1 - \eta \lambda)
            - \eta \, \frac{m_{t,i} / (1 - \beta_1^t)}{\sqrt{v_{B,t} / (1 - \beta_2^t)} + \epsilon}
            \quad (i \in B).

    Blocks (per-group key ``blocks``) split dim 0: ``"tensor"`` is one block, ``"row"`` one
    block per index of dim 0 (one per logit for the output layer), an int ``k`` makes ``k``
    equal chunks (3 for a fused QKV weight). The layout fixes the shape of ``exp_avg_sq``
    when a parameter's state is created.

    Frozen Adalayer (``freeze_after=T``): during steps :math:`t \le T` the parameter does not
    move (the study's lr = 0 phase) while :math:`m` updates and :math:`v` takes the weight
    :math:`\beta_{2,t} = 1 - 1/t`, so :math:`v_T` is the plain mean of the first :math:`T`
    block means (the study's code uses :math:`1 - 1/(t+1)`, which also averages in the zero
    initial :math:`v`). Afterwards :math:`v` stays fixed, except in groups with
    ``keep_adapting=True`` (the study's last layer and LayerNorms), where it keeps its
    :math:`\beta_2` EMA. Frozen mode drops the second-moment bias correction.

    State: ``step``, ``exp_avg`` (like the parameter) and ``exp_avg_sq`` (one entry per
    block), about 4 bytes per parameter in float32. State is float32 for bf16/fp16
    parameters (the update is computed in float32 and cast back) and float64 for float64
    ones.

    Under FSDP2 (parameters sharded on dim 0 as ``DTensor``, :mod:`lm_opt.optim.sharded`) the
    step is that of one process, up to float32 summation order. Blocks are runs of whole rows,
    so a block of one row (``"row"``) is local: its ``exp_avg_sq`` entries are sharded like the
    parameter, and nothing is communicated. Larger blocks (``"tensor"``, ``k`` chunks, which
    may straddle shards) take partial sums of g^2 from each rank's rows (placed by the rank's
    global row offset) and one all-reduce per param group sums them; every rank then holds
    all ``n`` entries of ``exp_avg_sq``. Communication per step: ``n`` floats per parameter of
    ``n`` multi-row blocks (1 per tensor, 3 per fused QKV weight), 0 with one block per row or
    while ``v`` is frozen. Memory per rank of :math:`W`: ``exp_avg`` on the rank's
    :math:`\lceil \text{rows} / W \rceil` rows at most, ``exp_avg_sq`` on as many rows or
    whole (``n`` floats); the state dict holds the shards as ``DTensor`` like the parameter.

    ``fused=True`` compiles the step (the block means of :math:`g^2`, then one pass over
    :math:`p, g, m`), as :class:`~lm_opt.optim.lion.Lion` does (same requirements and
    caveats); frozen Adalayer's lr = 0 steps stay eager, since they only touch the state.

    Args:
        params: Parameters or param-group dicts; any keyword below may be set per group.
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: Added after the square root.
        weight_decay: Decoupled weight decay :math:`\lambda`.
        blocks: Block layout: ``"tensor"``, ``"row"`` or a positive int.
        freeze_after: :math:`T`, the number of warm-up steps of frozen Adalayer; None for
            plain Adalayer.
        keep_adapting: In frozen mode, keep updating :math:`v` after step :math:`T`.
        foreach: Use the multi-tensor path; None turns it on when all parameters of a
            group share a device.
        fused: Use the compiled step; ``None`` means False.
    """

    sharding_scheme = (
        "block statistics: all-reduce of n floats per tensor of n multi-row blocks, 0 if one-row"
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        blocks: str | int = "tensor",
        freeze_after: int | None = None,
        keep_adapting: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            blocks=blocks,
            freeze_after=freeze_after,
            keep_adapting=keep_adapting,
            foreach=foreach,
            fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, checking its hyperparameters and its parameters' block layout."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        check_args(
            lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"]
        )
        blocks = group["blocks"]
        if blocks not in ("tensor", "row") and not (type(blocks) is int and blocks > 0):
            raise ValueError(f"Invalid blocks: {blocks!r} (must be 'tensor', 'row' or an int > 0)")
        freeze_after = group["freeze_after"]
        if freeze_after is not None and not (type(freeze_after) is int and freeze_after > 0):
            raise ValueError(f"Invalid freeze_after: {freeze_after!r} (must be None or an int > 0)")
        for p in group["params"]:
            num_blocks(p.shape, blocks)

    @staticmethod
    def _check_role(role: str, n_head: int, fused: int) -> None:
        if role not in ROLES:
            raise ValueError(f"Invalid role: {role!r} (must be one of {ROLES})")
        if not n_head >= 1:
            raise ValueError(f"Invalid n_head: {n_head} (must be >= 1)")
        if not fused >= 1:
            raise ValueError(f"Invalid fused: {fused} (must be >= 1)")

    @classmethod
    def block_layout(cls, role: str, *, n_head: int, fused: int = 1) -> str | int:
        """The study's ``blocks`` for a parameter of the given role.

        Args:
            role: One of "embedding", "matrix", "norm", "last_layer".
            n_head: Number of attention heads (unused by Adalayer).
            fused: How many projections are fused along dim 0 (3 for the QKV weight).

        Returns:
            "row" for the last layer (one block per logit), ``fused`` for fused
            projections, "tensor" otherwise.
        """
        cls._check_role(role, n_head, fused)
        if role == "last_layer":
            return "row"
        return fused if fused > 1 else "tensor"

    def hold_steps(self) -> int:
        """Frozen Adalayer's :math:`T` steps, which the lr schedule holds at 0 while :math:`v`
        accumulates and which lengthen the run (:mod:`lm_opt.optim.hooks`); 0 for plain Adalayer."""
        return max((group["freeze_after"] or 0 for group in self.param_groups), default=0)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # A parameter that skipped steps (grad None) has its own step count.
        by_step: dict[int, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                self._init_state(p, state, group["blocks"])
            state["step"] += 1
            by_step.setdefault(int(state["step"].item()), []).append(p)
        shards = self._shard_statistics(group, by_step)

        foreach = use_foreach(group, params)
        fused = group.get("fused") and fusable(params)
        for t, same_step in by_step.items():
            hparams = step_hparams(t, group)
            grads = [local(p.grad) for p in same_step]
            exp_avgs = [local(self.state[p]["exp_avg"]) for p in same_step]
            exp_avg_sqs = [local(self.state[p]["exp_avg_sq"]) for p in same_step]
            block_means, blocks = zip(*(shards.get(id(p), (None, None)) for p in same_step))
            if fused and hparams["lr"] != 0.0:
                v_weight, bias_correction2, decay, step_size = scalars(
                    hparams["v_weight"],
                    hparams["bias_correction2"],
                    1 - hparams["lr"] * hparams["weight_decay"],
                    hparams["lr"] / hparams["bias_correction1"],
                )
                compiled(adalayer_fused)(
                    same_step, grads, exp_avgs, exp_avg_sqs, beta1=hparams["beta1"], eps=hparams["eps"],
                    v_weight=v_weight, bias_correction2=bias_correction2, decay=decay, step_size=step_size,
                )
                continue
            same_step = [local(p) for p in same_step]
            if foreach:
                adalayer_update_foreach(same_step, grads, exp_avgs, exp_avg_sqs, **hparams,
                                        block_means=block_means, row_blocks=blocks)
                continue
            for p, g, m, v, means, index in zip(
                same_step, grads, exp_avgs, exp_avg_sqs, block_means, blocks
            ):
                adalayer_update(p, g, m, v, **hparams, block_means=means, row_block=index)

    def _shard_statistics(
        self, group: dict[str, Any], by_step: dict[int, list[Tensor]]
    ) -> dict[int, tuple[Tensor | None, Tensor | None]]:
        """Per dim-0 shard (by id): its block means of g^2 where its ``v`` takes them this step
        (:func:`shard_block_means`, one all-reduce for the group), and its :func:`row_blocks`."""
        blocks = group["blocks"]
        takes = [
            p for t, same in by_step.items() if step_hparams(t, group)["v_weight"] for p in same
            if is_dtensor(p)
        ]
        dtypes = [self.state[p]["exp_avg"].dtype for p in takes]
        means = dict(zip(map(id, takes), shard_block_means(takes, dtypes, blocks)))
        return {
            id(p): (means.get(id(p)), row_blocks(p, num_blocks(p.shape, blocks)))
            for same in by_step.values() for p in same if is_dtensor(p)
        }

    @staticmethod
    def _init_state(p: Tensor, state: dict[str, Tensor], blocks: str | int) -> None:
        """Zero state; ``exp_avg`` of a dim-0 shard is sharded like it, and so is ``exp_avg_sq``
        where each row is a block (other blocks span shards: every rank holds all of them)."""
        dtype, shard = state_dtype(p), local(p)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = rows_like(p, torch.zeros(shard.shape, dtype=dtype, device=p.device))
        n = num_blocks(p.shape, blocks)
        if is_dtensor(p) and n == p.shape[0]:
            v = torch.zeros(shard.shape[0], dtype=dtype, device=p.device)
            state["exp_avg_sq"] = rows_like(p, v)
        else:
            state["exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=p.device)

    def effective_lr(self, p: Tensor) -> Tensor | None:
        """Per-block ``lr / (sqrt(v_hat) + eps)`` from the current state.

        ``v_hat`` is ``exp_avg_sq`` with the bias correction the last step applied, so
        that step moved block ``B`` of ``p`` by ``-effective_lr[B] * exp_avg / (1 - beta1^t)``
        (plus weight decay) if ``lr`` has not changed since.

        Returns:
            A tensor shaped like ``exp_avg_sq`` (one value per block), zeros while a frozen
            parameter is still in its lr = 0 phase, or None before ``p``'s first step.
        """
        state = self.state.get(p)
        if not state:
            return None
        group = group_of(self, p)
        hparams = step_hparams(int(state["step"].item()), group)
        v_hat = state["exp_avg_sq"] / hparams["bias_correction2"]
        return hparams["lr"] / (v_hat.sqrt() + hparams["eps"])
