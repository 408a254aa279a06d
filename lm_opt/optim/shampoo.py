"""Shampoo with Adam grafting: the baseline SOAP is compared with (Gupta et al. 2018)."""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.kronecker import (
    KroneckerOptimizer,
    contract,
    eigh_with_fallback,
    factor_beta,
    init_factors,
    update_factors_,
)

GRAFTINGS = ("adam", "none")


def damped_matrix_power(mat: Tensor, exponent: float, eps: float) -> Tensor:
    """``(mat + eps I)^exponent`` of a symmetric PSD matrix, through its eigenvalues.

    Eigenvalues rounded below zero are clipped to zero first, so the damping ``eps``
    alone bounds the inverse root.
    """
    vals, vecs = eigh_with_fallback(mat)
    return (vecs * (vals.clamp_min(0) + eps) ** exponent) @ vecs.T


def adam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, step: int, betas: tuple[float, float], eps: float
) -> Tensor:
    """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)``."""
    beta1, beta2 = betas
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
    return exp_avg / (1 - beta1**step) / denom


def graft(direction: Tensor, magnitude: Tensor) -> Tensor:
    """``direction`` rescaled to the Frobenius norm of ``magnitude`` (0 if it is 0)."""
    norm = direction.norm()
    scale = torch.where(norm > 0, magnitude.norm() / norm, torch.zeros_like(norm))
    return direction * scale


class Shampoo(KroneckerOptimizer):
    r"""Shampoo with momentum and layer-wise Adam grafting.

    From "Shampoo: Preconditioned Stochastic Tensor Optimization" (Gupta et al. 2018,
    arXiv:1802.09568), in the form SOAP (Vyas et al. 2024, arXiv:2409.11321) compares
    against. For a matrix gradient :math:`G_t` at step :math:`t`:

    .. math::
        M &\leftarrow \beta_1 M + (1 - \beta_1) G_t, \qquad
        V \leftarrow \beta_2 V + (1 - \beta_2) G_t^2 \\
        L &\leftarrow \beta_s L + (1 - \beta_s) G_t G_t^\top, \qquad
        R \leftarrow \beta_s R + (1 - \beta_s) G_t^\top G_t \\
        P_L &= (L + \epsilon I)^{e}, \quad P_R = (R + \epsilon I)^{e}
            \quad \text{(recomputed when } (t - 1) \bmod f = 0) \\
        D &= P_L \hat M P_R, \qquad
        A = \frac{\hat M}{\sqrt{\hat V} + \epsilon}, \qquad
        p \leftarrow p - \eta_t \frac{\lVert A \rVert_F}{\lVert D \rVert_F} D, \qquad
        p \leftarrow p \, (1 - \eta_t \lambda)

    with bias-corrected :math:`\hat M, \hat V`, :math:`\beta_s` = ``shampoo_beta``
    (``betas[1]`` when -1), :math:`f` = ``precondition_frequency`` and :math:`e` =
    ``exponent``. The inverse roots come from an ``eigh`` of each factor, finite for a
    singular one too (:func:`~lm_opt.optim.kronecker.eigh_with_fallback`). Grafting
    (Agarwal et al. 2020) takes Shampoo's direction and Adam's per-tensor step size;
    ``grafting="none"`` applies :math:`\eta_t D` as it is.

    The exponent: -1/4 (default) is classic Shampoo for matrices, :math:`L^{-1/4} G
    R^{-1/4}`; -1/2 is the "Shampoo^2" of the SOAP paper, whose eigenbasis SOAP runs
    Adam in. A tensor of order :math:`k` gets the same exponent on each of its
    :math:`k` factors (classic Shampoo would use :math:`-1/(2k)`). A dim larger than
    ``max_precond_dim`` is not preconditioned; a tensor with no preconditioned dim
    (1-D, 0-D, or every dim too large) takes the plain Adam step :math:`A`.

    State (4 bytes per float32 number): ``exp_avg`` (:math:`M`), ``exp_avg_sq``
    (:math:`V`), ``GG`` (the factors, ``None`` for an unpreconditioned dim),
    ``precond`` (the matrices :math:`P`), ``step`` (an int). A ``d_out x d_in``
    matrix costs :math:`8 + 8 (d_{out}^2 + d_{in}^2) / (d_{out} d_{in})` bytes per
    parameter, like SOAP. State is float32 even for bf16/fp16 parameters (the update
    is computed in float32 and cast back); float64 parameters keep float64.

    Sharded parameters (FSDP2 ``DTensor``, dim 0 over a 1-D mesh of :math:`W` ranks)
    take the same update, computed whole on one owner rank per tensor (round-robin in
    parameter order; :mod:`lm_opt.optim.owner`). Per step and ``r x c`` matrix, one
    ``all_to_all`` gathers the gradient to its owner, :math:`(W - 1) r c / W` elements
    when :math:`W` divides :math:`r` (in general :math:`r c` less the owner's rows), and a
    second returns as many of the update plus the step size to each other rank
    (:math:`W - 1` numbers). All the state above lives on the owner only, so
    a rank holds the state of about :math:`1/W` of the tensors (by count, not size), plus
    for each tensor it owns a transient full gradient and update (:math:`2 r c`).

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: momentum, and Adam's second moment used
            for grafting and for the plain Adam step.
        shampoo_beta: EMA coefficient of the factors; -1 means ``betas[1]``.
        eps: Damping :math:`\epsilon I` of the factors, and Adam's epsilon.
        weight_decay: Decoupled weight decay :math:`\lambda`, applied after the step.
        precondition_frequency: Steps between recomputations of the inverse roots.
        max_precond_dim: Dims larger than this are not preconditioned.
        exponent: Power :math:`e < 0` of each factor.
        grafting: ``"adam"`` (layer-wise Adam grafting) or ``"none"``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        exponent: float = -0.25,
        *,
        grafting: str = "adam",
    ) -> None:
        if not exponent < 0.0:
            raise ValueError(f"Invalid exponent: {exponent} (must be < 0)")
        if grafting not in GRAFTINGS:
            raise ValueError(f"Invalid grafting: {grafting!r} (must be one of {GRAFTINGS})")
        super().__init__(
            params,
            lr,
            betas,
            shampoo_beta,
            eps,
            weight_decay,
            precondition_frequency,
            max_precond_dim,
            exponent=exponent,
            grafting=grafting,
        )

    def _direction(
        self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, float]:
        if not state:
            self._init_state(state, grad, group)

        state["step"] += 1
        step = state["step"]
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        adam = adam_direction(exp_avg, exp_avg_sq, step, group["betas"], group["eps"])
        if all(f is None for f in state["GG"]):
            return adam, group["lr"]
        update_factors_(state["GG"], grad, factor_beta(group))
        if (step - 1) % group["precondition_frequency"] == 0:
            state["precond"] = [
                None if f is None else damped_matrix_power(f, group["exponent"], group["eps"])
                for f in state["GG"]
            ]
        update = contract(exp_avg / (1 - beta1**step), state["precond"], False)
        if group["grafting"] == "adam":
            update = graft(update, adam)
        return update, group["lr"]

    @staticmethod
    def _init_state(state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> None:
        """Zero moments and factors; the roots are computed on the first step."""
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
        if grad.dim() >= 2:
            factors = init_factors(grad.shape, group["max_precond_dim"], grad.dtype, grad.device)
        else:
            factors = [None] * grad.dim()
        state["GG"] = factors
        state["precond"] = [None] * grad.dim()
