"""Adam-mini: one second moment per Hessian-structured block (Zhang et al. 2024)."""

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lm_opt.optim.adalayer import Adalayer


class AdamMini(Adalayer):
    r"""Adam-mini, from "Adam-mini: Use Fewer Learning Rates To Gain More" (Zhang et al. 2024,
    arXiv:2406.16793).

    Adam's per-coordinate momentum with one second moment per block, the math of
    :class:`~lm_opt.optim.adalayer.Adalayer` (without its frozen mode):

    .. math::
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_{B,t} = \beta_2 v_{B,t-1} + (1 - \beta_2) \operatorname{mean}_{i \in B} g_{t,i}^2,

        p_i \leftarrow p_i (1 - \eta \lambda)
            - \eta \, \frac{m_{t,i} / (1 - \beta_1^t)}{\sqrt{v_{B,t} / (1 - \beta_2^t)} + \epsilon}
            \quad (i \in B).

    What differs is the partition (:meth:`block_layout`), which follows the blocks of the
    Hessian: one block per token for the embedding and the output layer, one per head for
    the fused QKV projection, one per output neuron (row) for the other matrices, and one
    per LayerNorm tensor.

    State: ``step``, ``exp_avg`` (like the parameter) and ``exp_avg_sq`` (one entry per
    block), about 4 bytes per parameter in float32, half of AdamW's. State is float32 for
    bf16/fp16 parameters (the update is computed in float32 and cast back) and float64 for
    float64 ones.

    Under FSDP2 it runs Adalayer's sharded scheme, exact up to float32 summation order:
    per-row blocks (tokens, neurons) are local, while the per-head blocks of a fused QKV
    weight (``3 * n_head`` of ``head_size`` rows, which may straddle shards) and the one
    block of a LayerNorm gain are sums of each rank's partial sums, all-reduced.
    Communication per step: ``3 * n_head`` floats per QKV weight and 1 per LayerNorm, in one
    all-reduce per param group. Memory per rank: ``exp_avg`` and per-row ``exp_avg_sq`` on
    the rank's rows, the per-head and per-tensor ``exp_avg_sq`` whole.

    Args:
        params: Parameters or param-group dicts; any keyword below may be set per group.
        lr: Learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: Added after the square root.
        weight_decay: Decoupled (AdamW-style) weight decay :math:`\lambda`.
        blocks: Block layout, ``"tensor"``, ``"row"`` or a positive int ``k`` (``k`` equal
            chunks of dim 0); routing sets it per group from :meth:`block_layout`.
        foreach: Use the multi-tensor path; None turns it on when all parameters of a
            group share a device.
    """

    sharding_scheme = (
        "block statistics: all-reduce of 3 n_head floats per QKV weight, 1 per LayerNorm"
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        *,
        blocks: str | int = "row",
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, blocks=blocks, foreach=foreach)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["freeze_after"] is not None:
            raise ValueError(
                f"Invalid freeze_after: {group['freeze_after']!r} (AdamMini has no frozen mode)"
            )

    @classmethod
    def block_layout(cls, role: str, *, n_head: int, fused: int = 1) -> str | int:
        """Adam-mini's ``blocks`` for a parameter of the given role.

        Args:
            role: One of "embedding", "matrix", "norm", "last_layer".
            n_head: Number of attention heads.
            fused: How many projections are fused along dim 0 (3 for the QKV weight).

        Returns:
            ``fused * n_head`` (one block per head) for a fused QKV matrix, "tensor" for
            norms, "row" (one block per token or output neuron) otherwise.
        """
        cls._check_role(role, n_head, fused)
        if role == "norm":
            return "tensor"
        if role == "matrix" and fused > 1:
            return fused * n_head
        return "row"
