"""Adalayer: Adam with one second-moment scalar per block of a parameter."""

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
    group_of,
    scalars,
    state_dtype,
    use_foreach,
)

ROLES = ("embedding", "matrix", "norm", "last_layer")


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
) -> None:
    """One Adalayer step on one tensor, in place; ``exp_avg_sq`` holds one entry per block."""
    n = exp_avg_sq.numel()
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - beta1)
    if v_weight:
        exp_avg_sq.lerp_(block_mean_sq(g, n), v_weight)
    if lr == 0.0:  # frozen Adalayer's warm-up moves nothing: skip the full-size update
        return
    denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
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
) -> None:
    """:func:`adalayer_update` on many tensors.

    The momentum, the second moments and weight decay use ``torch._foreach_*`` kernels; the
    block reductions and the broadcast division run per tensor.
    """
    ns = [v.numel() for v in exp_avg_sqs]
    gs = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    if v_weight:
        torch._foreach_lerp_(exp_avg_sqs, [block_mean_sq(g, n) for g, n in zip(gs, ns)], v_weight)
    if lr == 0.0:
        return
    denoms = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    ps = [p.to(m.dtype).contiguous() for p, m in zip(params, exp_avgs)]
    if weight_decay:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    for p, m, d, n in zip(ps, exp_avgs, denoms, ns):
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
    ones. Block statistics need the whole tensor, so FSDP2 (``DTensor``) sharded parameters
    are refused with a ``RuntimeError`` naming the optimizer, at construction (or
    ``add_param_group``).

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

    sharding_reason = "its block means of g^2 span whole blocks of the tensor"

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

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # A parameter that skipped steps (grad None) has its own step count.
        by_step: dict[int, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                dtype = state_dtype(p)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros(p.shape, dtype=dtype, device=p.device)
                n = num_blocks(p.shape, group["blocks"])
                state["exp_avg_sq"] = torch.zeros(n, dtype=dtype, device=p.device)
            state["step"] += 1
            by_step.setdefault(int(state["step"].item()), []).append(p)

        foreach = use_foreach(group, params)
        fused = group.get("fused") and fusable(params)
        for t, same_step in by_step.items():
            hparams = step_hparams(t, group)
            grads = [p.grad for p in same_step]
            exp_avgs = [self.state[p]["exp_avg"] for p in same_step]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in same_step]
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
            if foreach:
                adalayer_update_foreach(same_step, grads, exp_avgs, exp_avg_sqs, **hparams)
                continue
            for p, g, m, v in zip(same_step, grads, exp_avgs, exp_avg_sqs):
                adalayer_update(p, g, m, v, **hparams)

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
