"""Muon: momentum orthogonalized by Newton-Schulz, on whole matrices, sharded or not."""

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lm_opt.optim.owner import OwnerOptimizer
from lm_opt.optim.state import check_args

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def newton_schulz(x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    r"""Approximate orthogonalization of a matrix, in bfloat16, as ``torch.optim.Muon`` computes it.

    :math:`X \leftarrow X / \max(\lVert X \rVert_F, \epsilon)` with the wide side as rows, then
    ``steps`` times :math:`X \leftarrow a X + (b A + c A^2) X` with :math:`A = X X^\top`.
    For :math:`X = U S V^\top` the result is :math:`U f(S) V^\top`: the quintic's coefficients
    push every singular value not far below the largest into about [0.7, 1.2] in five steps,
    fast rather than exactly to 1 (Jordan et al. 2024).
    """
    a, b, c = coefficients
    tall = x.size(0) > x.size(1)
    x = x.bfloat16()
    if tall:
        x = x.T
    x = x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    r"""The learning rate scaled for an ``A x B`` matrix's orthogonal update.

    ``"original"`` (or None): :math:`\eta \sqrt{\max(1, A / B)}` (Jordan's Muon);
    ``"match_rms_adamw"``: :math:`0.2\, \eta \sqrt{\max(A, B)}`, an update RMS near AdamW's
    (Liu et al. 2025, "Muon is Scalable for LLM Training").
    """
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * math.sqrt(max(1, rows / cols))


class Muon(OwnerOptimizer):
    r"""Muon (Jordan et al. 2024): SGD momentum, orthogonalized per matrix by Newton-Schulz.

    For a matrix gradient :math:`G_t`, with momentum :math:`\mu` and learning rate :math:`\eta`:

    .. math::
        B &\leftarrow \mu B + (1 - \mu) G_t, \qquad
        U = \begin{cases} (1 - \mu) G_t + \mu B & \text{nesterov} \\ B & \text{otherwise} \end{cases} \\
        W &\leftarrow (1 - \eta \lambda) W - \eta'\, \mathrm{NS}_k(U)

    where :math:`\mathrm{NS}_k` is :func:`newton_schulz` and :math:`\eta'` is
    :func:`adjusted_lr`. The same arithmetic as ``torch.optim.Muon``, to the bit on one
    process (tested); unlike it, this class also takes FSDP2-sharded matrices.

    State: ``momentum_buffer`` (:math:`B`), one number per parameter in float32 for
    bf16/fp16 parameters. Only 2-D parameters are taken: route embeddings, norms and the last
    layer to another optimizer.

    Sharded parameters (FSDP2 ``DTensor``, dim 0 over a 1-D mesh of :math:`W` ranks) take
    the same update, computed whole on one owner rank per matrix (round-robin in parameter
    order; :mod:`lm_opt.optim.owner`): Newton-Schulz needs :math:`X X^\top` of the whole
    matrix. Per step and ``r x c`` matrix, one ``all_to_all`` gathers the gradient to its
    owner, :math:`(W - 1) r c / W` elements when :math:`W` divides :math:`r` (in general
    :math:`r c` less the owner's rows), and a second returns as many of the update plus the
    step size to each other rank (:math:`W - 1` numbers). The momentum lives on the owner
    only: a rank holds it for about :math:`1/W` of the matrices (by count), plus for each
    matrix it owns a transient full gradient and update (:math:`2 r c`) and the bfloat16
    Newton-Schulz iterate and Gram matrices (:math:`r c + 2 \min(r, c)^2`).

    Args:
        params: 2-D parameters or parameter groups to optimize.
        lr: Learning rate :math:`\eta`, before :func:`adjusted_lr`.
        weight_decay: Decoupled weight decay :math:`\lambda`, applied before the update.
        momentum: :math:`\mu`.
        nesterov: Orthogonalize the Nesterov look-ahead rather than the buffer.
        ns_coefficients: :math:`(a, b, c)` of the quintic iteration.
        eps: Floor of the Frobenius norm that normalizes :math:`U`.
        ns_steps: Newton-Schulz iterations :math:`k`.
        adjust_lr_fn: ``"original"`` (None) or ``"match_rms_adamw"``.
    """

    decay_first = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        check_args(lr=lr, eps=eps, weight_decay=weight_decay, momentum=momentum)
        if len(ns_coefficients) != 3:
            raise ValueError(f"Invalid ns_coefficients: {ns_coefficients} (must be three numbers)")
        if not 1 <= ns_steps < 100:
            raise ValueError(f"Invalid ns_steps: {ns_steps} (must be in [1, 100))")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r} (must be one of {ADJUST_LR_FNS})")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group of 2-D parameters."""
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dim() != 2:
                self.param_groups.pop()
                raise ValueError(f"Muon takes 2-D parameters (matrices); got one of shape {tuple(p.shape)}")

    def _direction(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> tuple[Tensor, float]:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        momentum, buf = group["momentum"], state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        return update.to(grad.dtype), adjusted_lr(group["lr"], group["adjust_lr_fn"], grad.shape)
