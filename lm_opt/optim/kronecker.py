"""Kronecker-factored preconditioning shared by SOAP and Shampoo.

A gradient ``G`` with dims ``(d_0, ..., d_{k-1})`` gets one factor per dim ``i``: an
EMA of the mode-``i`` Gram matrix ``G_(i) G_(i)^T`` (``d_i x d_i``), where ``G_(i)`` is
``G`` unfolded along dim ``i`` (for a matrix: ``G G^T`` and ``G^T G``). A dim larger
than ``max_precond_dim`` gets no factor (``None``) and is left as it is, which keeps the
vocabulary axis of the embedding and of the output layer one-sided.

Every Gram matrix is a sum over the whole tensor, so it cannot be formed from one shard
of a sharded parameter: SOAP and Shampoo update a sharded (FSDP2) parameter whole, on
one owner rank (:mod:`lm_opt.optim.owner`).
"""

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.owner import OwnerOptimizer
from lm_opt.optim.state import check_args


def factor_beta(group: dict[str, Any]) -> float:
    """EMA coefficient of the factors: ``shampoo_beta``, or ``betas[1]`` if it is -1."""
    return group["betas"][1] if group["shampoo_beta"] < 0 else group["shampoo_beta"]


def init_factors(
    shape: Iterable[int], max_precond_dim: int, dtype: torch.dtype, device: torch.device
) -> list[Tensor | None]:
    """Zero ``d x d`` statistics for each dim ``d <= max_precond_dim``, else ``None``."""
    return [
        torch.zeros(d, d, dtype=dtype, device=device) if d <= max_precond_dim else None
        for d in shape
    ]


def update_factors_(factors: list[Tensor | None], grad: Tensor, beta: float) -> None:
    """``factor_i <- beta * factor_i + (1 - beta) * G_(i) G_(i)^T``, in place."""
    for i, factor in enumerate(factors):
        if factor is None:
            continue
        others = [j for j in range(grad.dim()) if j != i]
        factor.lerp_(torch.tensordot(grad, grad, dims=(others, others)), 1 - beta)


EIGH_SHIFT = 1e-30
"""Added to the diagonal before ``eigh``, as the SOAP reference code does."""


def eigh_with_fallback(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending eigenvalues and eigenvectors of a symmetric PSD statistic, ``mat + 1e-30 I``'s.

    A rank-deficient gradient makes a singular statistic: the rows of embedding tokens absent
    from every batch so far are exactly zero, and all of it is for a parameter unused so far.
    Float32 ``eigh`` (MKL's on the CPU, cuSOLVER's) then can return NaN vectors or fail to
    converge. The shift leaves no exactly zero row, and with it MKL's float32 ``eigh`` is finite
    on such statistics and SOAP takes the reference code's basis; in float32 it changes no
    entry above 1e-22, in whose rounding it is lost. A decomposition that still raises or is
    not finite is redone in float64 and cast back.
    """
    eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    for dtype in dict.fromkeys((mat.dtype, torch.float64)):
        try:
            vals, vecs = torch.linalg.eigh(mat.to(dtype) + EIGH_SHIFT * eye.to(dtype))
        except RuntimeError:
            continue
        if vals.is_meta or (vals.isfinite().all() and vecs.isfinite().all()):  # meta: shapes only
            return vals.to(mat.dtype), vecs.to(mat.dtype)
    finite = "finite" if mat.isfinite().all() else "non-finite"
    raise RuntimeError(f"eigh failed on a {finite} {tuple(mat.shape)} statistic in {mat.dtype} and float64")


def eigenbasis(mat: Tensor) -> Tensor:
    """Eigenvectors of a symmetric matrix as columns, by descending eigenvalue."""
    return eigh_with_fallback(mat)[1].flip(1)


def refresh_eigenbasis(mat: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration step from ``basis`` towards the eigenvectors of ``mat``.

    SOAP (Vyas et al. 2024, Algorithm 4) replaces a full ``eigh`` by ``QR(mat @ Q)``,
    with the columns first sorted by the eigenvalue estimate ``diag(Q^T mat Q)`` so that
    they keep a descending order. Returns the new basis and that column order, which the
    caller applies to whatever is indexed by the basis columns.
    """
    power = mat @ basis
    order = torch.argsort((basis * power).sum(0), descending=True)
    return torch.linalg.qr(power[:, order])[0], order


def contract(x: Tensor, mats: list[Tensor | None], transpose: bool) -> Tensor:
    """Multiply every dim ``i`` of ``x`` by ``mats[i]`` (or its transpose); skip ``None``.

    With eigenbases ``Q_i``, ``transpose=True`` maps into the eigenbasis (``Q_i^T``
    along dim ``i``) and ``transpose=False`` maps back. Each contraction eats dim 0 and
    appends the result as the last dim, so after all dims the order is restored.
    """
    for mat in mats:
        if mat is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, mat, dims=([0], [0 if transpose else 1]))
    return x


class KroneckerOptimizer(OwnerOptimizer):
    """What SOAP and Shampoo share: their common hyperparameters, checked, and the owner scheme.

    A subclass passes its own hyperparameters on as ``defaults`` and writes
    :meth:`~lm_opt.optim.owner.OwnerOptimizer._direction`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        shampoo_beta: float,
        eps: float,
        weight_decay: float,
        precondition_frequency: int,
        max_precond_dim: int,
        **defaults: Any,
    ) -> None:
        check_args(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if not (shampoo_beta == -1 or 0.0 <= shampoo_beta < 1.0):
            raise ValueError(f"Invalid shampoo_beta: {shampoo_beta} (must be -1 or in [0, 1))")
        if not precondition_frequency >= 1:
            raise ValueError(f"Invalid precondition_frequency: {precondition_frequency} (must be >= 1)")
        if not max_precond_dim >= 1:
            raise ValueError(f"Invalid max_precond_dim: {max_precond_dim} (must be >= 1)")
        super().__init__(
            params,
            dict(
                lr=lr,
                betas=tuple(betas),
                shampoo_beta=shampoo_beta,
                eps=eps,
                weight_decay=weight_decay,
                precondition_frequency=precondition_frequency,
                max_precond_dim=max_precond_dim,
                **defaults,
            ),
        )
