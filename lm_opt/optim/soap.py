"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024)."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.kronecker import (
    KroneckerOptimizer,
    contract,
    eigenbasis,
    factor_beta,
    init_factors,
    refresh_eigenbasis,
    update_factors_,
)
from lm_opt.optim.state import group_of

DATA_FORMATS = ("channels_first", "channels_last")


def merged_shape(shape: Iterable[int], max_precond_dim: int) -> tuple[int, ...]:
    """Merge adjacent dims while their product stays ``<= max_precond_dim``.

    A conv kernel ``(128, 64, 3, 3)`` with ``max_precond_dim=1000`` becomes
    ``(128, 576)``: fewer, larger factors instead of tiny 3 x 3 ones.
    """
    merged, run = [], 1
    for d in shape:
        if run * d <= max_precond_dim:
            run *= d
        elif run > 1:
            merged.append(run)
            run = d
        else:
            merged.append(d)
    if run > 1 or not merged:
        merged.append(run)
    return tuple(merged)


def to_precond_layout(x: Tensor, group: dict[str, Any]) -> Tensor:
    """View ``x`` in the layout the factors act on (dims merged if ``merge_dims``)."""
    if not group["merge_dims"]:
        return x
    if group["data_format"] == "channels_last" and x.dim() == 4:
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW, so H and W merge, not W and C
    return x.reshape(merged_shape(x.shape, group["max_precond_dim"]))


def from_precond_layout(x: Tensor, shape: torch.Size, group: dict[str, Any]) -> Tensor:
    """Inverse of :func:`to_precond_layout` for a tensor of original ``shape``."""
    if not group["merge_dims"]:
        return x
    if group["data_format"] == "channels_last" and len(shape) == 4:
        n, h, w, c = shape
        return x.reshape(n, c, h, w).permute(0, 2, 3, 1)
    return x.reshape(shape)


def soap_step_size(group: dict[str, Any], step: int) -> float:
    """``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, or ``lr`` without bias correction."""
    if not group["correct_bias"]:
        return group["lr"]
    beta1, beta2 = group["betas"]
    return group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)


def rms(x: Tensor) -> Tensor:
    """Root mean square; 1e-30 keeps a zero update from dividing by zero."""
    return x.square().mean().sqrt() + 1e-30


class SOAP(KroneckerOptimizer):
    r"""SOAP: ShampoO with Adam in the Preconditioner's eigenbasis.

    From "SOAP: Improving and Stabilizing Shampoo using Adam" (Vyas et al. 2024,
    arXiv:2409.11321), following the authors' code (nikhilvyas/SOAP). For a matrix
    gradient :math:`G_t` with factors :math:`L, R` and their eigenbases
    :math:`Q_L, Q_R`:

    .. math::
        G'_t &= Q_L^\top G_t Q_R \\
        M &\leftarrow \beta_1 M + (1 - \beta_1) G'_t, \qquad
        V \leftarrow \beta_2 V + (1 - \beta_2) G'^{\,2}_t \\
        p &\leftarrow p - \eta_t \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
            \, Q_L \frac{M}{\sqrt{V} + \epsilon} Q_R^\top, \qquad
        p \leftarrow p \, (1 - \eta_t \lambda) \\
        L &\leftarrow \beta_s L + (1 - \beta_s) G_t G_t^\top, \qquad
        R \leftarrow \beta_s R + (1 - \beta_s) G_t^\top G_t

    with :math:`\beta_s` = ``shampoo_beta`` (``betas[1]`` when -1). The momentum
    :math:`M` and :math:`V` live in the eigenbasis. The first step only sets up
    :math:`L, R` and takes :math:`Q_L, Q_R` from ``eigh`` (descending eigenvalues), so
    the parameter moves from the second step on and no gradient is ever projected
    with a basis it built. A singular factor (the rows of tokens absent from the batch)
    is decomposed as :math:`L + 10^{-30} I`, in float64 if float32 fails, as the
    reference code does (:func:`~lm_opt.optim.kronecker.eigh_with_fallback`). Every
    ``precondition_frequency`` steps each basis is refreshed by one power iteration
    :math:`Q \leftarrow \mathrm{QR}(L Q)`, its columns first sorted by the estimate
    :math:`\mathrm{diag}(Q^\top L Q)` and :math:`V` permuted to match; :math:`M` is
    carried from the old basis into the new one.

    Tensors of any order get one factor per dim; a dim larger than
    ``max_precond_dim`` is not rotated. 1-D tensors are plain Adam (with the same
    skipped first step) unless ``precondition_1d``.

    State (4 bytes per float32 number): ``exp_avg`` (:math:`M`) and ``exp_avg_sq``
    (:math:`V`) in the eigenbasis, ``GG`` (the factors, ``None`` for an unrotated dim),
    ``Q`` (the bases), ``step`` (updates applied, an int). A ``d_out x d_in`` matrix costs
    :math:`8 + 8 (d_{out}^2 + d_{in}^2) / (d_{out} d_{in})` bytes per parameter, 24 for
    a square one: three times AdamW. State is float32 even for bf16/fp16 parameters
    (the update is computed in float32 and cast back); float64 parameters keep float64.

    Sharded parameters (FSDP2 ``DTensor``, dim 0 over a 1-D mesh of :math:`W` ranks)
    take the same update, computed whole on one owner rank per tensor (round-robin in
    parameter order; :mod:`lm_opt.optim.owner`). Per step and ``r x c`` matrix, one
    ``all_to_all`` gathers the gradient to its owner, :math:`(W - 1) r c / W` elements
    when :math:`W` divides :math:`r` (in general :math:`r c` less the owner's rows), and a
    second returns as many of the update plus the step size to each other rank (:math:`W -
    1` numbers; nothing on the first step, which moves nothing). All the state
    above lives on the owner only, so a rank holds the state of about :math:`1/W` of the
    tensors (by count, not size), plus for each tensor it owns a transient full gradient
    and update (:math:`2 r c`), and its shards' send buffers.

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        betas: Adam's :math:`(\beta_1, \beta_2)`.
        shampoo_beta: EMA coefficient of the factors; -1 means ``betas[1]``.
        eps: Added to :math:`\sqrt{V}`.
        weight_decay: Decoupled weight decay :math:`\lambda`, applied after the step.
        precondition_frequency: Steps between refreshes of the eigenbases.
        max_precond_dim: Dims larger than this get no factor (identity basis).
        merge_dims: Merge adjacent dims while their product is ``<= max_precond_dim``.
        precondition_1d: Rotate 1-D tensors too (full ``d x d`` factor).
        normalize_grads: Rescale each tensor's update to unit RMS.
        data_format: ``"channels_first"`` (NCHW) or ``"channels_last"`` (NHWC); only
            decides how a 4-D tensor's dims merge.
        correct_bias: Use Adam's bias correction in the step size.
    """

    first_step_updates = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
    ) -> None:
        if data_format not in DATA_FORMATS:
            raise ValueError(
                f"Invalid data_format: {data_format!r} (must be one of {DATA_FORMATS})"
            )
        super().__init__(
            params,
            lr,
            betas,
            shampoo_beta,
            eps,
            weight_decay,
            precondition_frequency,
            max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
        )

    def _direction(
        self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, float] | None:
        shape, grad = grad.shape, to_precond_layout(grad, group)
        if not state:
            self._init_state(state, grad, group, len(shape))
            return None

        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad_rotated = contract(grad, state["Q"], transpose=True)
        exp_avg.mul_(beta1).add_(grad_rotated, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad_rotated, grad_rotated, value=1 - beta2)
        update = contract(
            exp_avg / exp_avg_sq.sqrt().add_(group["eps"]), state["Q"], transpose=False
        )
        if group["normalize_grads"]:
            update.div_(rms(update))

        # The factors take the current gradient only now, after it was projected
        # with a basis built from earlier gradients alone.
        update_factors_(state["GG"], grad, factor_beta(group))
        if state["step"] % group["precondition_frequency"] == 0:
            self._refresh_bases(state)
        return from_precond_layout(update, shape, group), soap_step_size(group, state["step"])

    @staticmethod
    def _init_state(state: dict[str, Any], grad: Tensor, group: dict[str, Any], ndim: int) -> None:
        """First step: statistics from this gradient and their ``eigh`` bases, no update.

        ``ndim`` is the parameter's order, before any merging of dims.
        """
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        if ndim == 1 and not group["precondition_1d"]:
            state["GG"] = [None]
        else:
            state["GG"] = init_factors(
                grad.shape, group["max_precond_dim"], grad.dtype, grad.device
            )
        update_factors_(state["GG"], grad, factor_beta(group))
        state["Q"] = [None if f is None else eigenbasis(f) for f in state["GG"]]

    @staticmethod
    def _refresh_bases(state: dict[str, Any]) -> None:
        """Power-iteration refresh of every basis; ``V`` follows the column order."""
        exp_avg = contract(state["exp_avg"], state["Q"], transpose=False)
        exp_avg_sq, bases = state["exp_avg_sq"], []
        for i, (factor, basis) in enumerate(zip(state["GG"], state["Q"])):
            if factor is not None:
                basis, order = refresh_eigenbasis(factor, basis)
                exp_avg_sq = exp_avg_sq.index_select(i, order)
            bases.append(basis)
        state["exp_avg_sq"], state["Q"] = exp_avg_sq, bases
        state["exp_avg"] = contract(exp_avg, state["Q"], transpose=True)

    def effective_lr(self, p: Tensor) -> Tensor | None:
        r"""Per-coordinate learning rate in the eigenbasis, from the current state.

        :math:`\eta \sqrt{1 - \beta_2^t} / (1 - \beta_1^t) / (\sqrt{V} + \epsilon)`, the
        factor SOAP multiplies the rotated momentum by (also divided by the update's RMS
        when ``normalize_grads``). Shaped like ``exp_avg_sq``.

        Returns:
            The tensor, or None before ``p``'s first update and on the ranks that do not
            own a sharded ``p`` (whose owner returns the whole tensor's).
        """
        state = self.state.get(p)
        if not state or state.get("step", 0) == 0:
            return None
        group = group_of(self, p)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        lr = soap_step_size(group, state["step"]) / denom
        if group["normalize_grads"]:
            # The bases are orthonormal, so the RMS is the same in either basis.
            lr.div_(rms(state["exp_avg"] / denom))
        return lr
