"""What the optimizers of `lm_opt.optim` share around their math.

Their base class (the closure, the walk over the parameters that have a gradient, and a
`load_state_dict` that keeps float32 state for bf16/fp16 parameters), the argument
checks of the AdamW-shaped constructors, the foreach choice, the compiled (`fused`) step, and the
refusal of sharded (`DTensor`) parameters by optimizers that need whole-tensor statistics and have
no sharded scheme.
"""

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lm_opt.optim.sharded import check_row_sharded


def state_dtype(param: Tensor) -> torch.dtype:
    """float32 for bf16/fp16 parameters, the parameter's own dtype otherwise."""
    return torch.promote_types(param.dtype, torch.float32)


def state_bytes(value) -> int:
    """Bytes of the tensors in an optimizer state value (nested lists and dicts included)."""
    if torch.is_tensor(value):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    return 0


def check_args(
    *,
    lr: float | None = None,
    betas: tuple[float, ...] | None = None,
    eps: float | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
) -> None:
    """Raise ``ValueError`` naming the first invalid argument; None skips a check.

    ``not x >= 0`` rather than ``x < 0`` so that NaN is refused too.
    """
    if lr is not None and not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    if betas is not None:
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (must be a pair)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid betas[{i}]: {beta} (must be in [0, 1))")
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
    if eps is not None and not eps > 0.0:
        raise ValueError(f"Invalid eps: {eps} (must be > 0)")
    if weight_decay is not None and not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")


def zeros_state(optimizer: Optimizer, params: list[Tensor], key: str) -> list[Tensor]:
    """Each parameter's ``state[key]``, created on first use as zeros in :func:`state_dtype`."""
    buffers = []
    for p in params:
        state = optimizer.state[p]
        if key not in state:
            state[key] = torch.zeros_like(
                p, dtype=state_dtype(p), memory_format=torch.preserve_format
            )
        buffers.append(state[key])
    return buffers


def use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    """``group["foreach"]``, or where it is None: whether ``params`` share one device."""
    if group["foreach"] is not None:
        return group["foreach"]
    return len({p.device for p in params}) == 1


def copy_back_(params: list[Tensor], work: list[Tensor]) -> None:
    """Write updates computed in the state's dtype back into low-precision parameters."""
    cast = [(p, w) for p, w in zip(params, work) if w is not p]
    if cast:
        torch._foreach_copy_([p for p, _ in cast], [w for _, w in cast])


def fusable(params: list[Tensor]) -> bool:
    """Whether the compiled (``fused``) step can take ``params``: plain dense tensors on one device.

    Tensor subclasses (FSDP2's ``DTensor``) keep the eager path.
    """
    return len({p.device for p in params}) == 1 and all(
        type(p) in (Tensor, torch.nn.Parameter) and type(p.grad) is Tensor for p in params
    )


@functools.cache
def compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` under ``torch.compile``, built on first use so that importing costs nothing.

    Inductor turns the per-tensor loop of ``fn`` into one pass over each tensor's memory.
    Each param group's list of shapes is compiled for as it is (``dynamic=False``:
    kernels generic in the sizes run slower); past dynamo's limit of 8 variants ``fn``
    runs eagerly, which computes the same thing. The per-step scalars are passed as 0-d
    tensors so that a schedule does not recompile.
    """
    return torch.compile(fn, dynamic=False)


def scalars(*values: float) -> list[Tensor]:
    """0-d float64 CPU tensors: inputs that a compiled step reads at run time, not constants."""
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def group_of(optimizer: Optimizer, param: Tensor) -> dict[str, Any]:
    """The param group that holds ``param``."""
    return next(g for g in optimizer.param_groups if any(q is param for q in g["params"]))


def _copy_state(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device=device, copy=True)
    if isinstance(value, dict):
        return {k: _copy_state(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_state(v, device) for v in value)
    return value


class BaseOptimizer(Optimizer):
    """An optimizer whose ``step`` hands each group's parameters with a gradient to
    :meth:`_update_group`, and whose ``load_state_dict`` keeps float32 state.

    A subclass whose statistics span more than one entry computes them exactly on FSDP2
    shards (with :mod:`lm_opt.optim.sharded` or :mod:`lm_opt.optim.owner`) and sets
    ``sharding_scheme`` (how, and what it communicates); its ``add_param_group`` (so its
    constructor too) then refuses DTensors laid out otherwise than FSDP2's ``Shard(0)``
    with a ``RuntimeError`` naming the optimizer. Elementwise optimizers leave it None and
    work on any DTensor as they are.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor
    (but ``step``) to its parameter's dtype, which would round float32 moments, factors
    and bases of bf16/fp16 parameters to bf16. For such parameters the saved state is
    copied in again as it was saved (nested lists included), on the parameter's device;
    ``step`` is left as torch placed it.
    """

    sharding_scheme: str | None = None

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Update ``params``, the parameters of ``group`` that have a gradient."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; sharded parameters only if the update is elementwise or has a
        sharded scheme."""
        super().add_param_group(param_group)
        if self.sharding_scheme is None:
            return
        try:
            for p in self.param_groups[-1]["params"]:
                check_row_sharded(p, type(self).__name__)
        except RuntimeError:
            self.param_groups.pop()
            raise

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
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if params:
                self._update_group(group, params)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping the saved dtypes of low-precision parameters' state."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for param_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(param_id)
            if saved is None or state_dtype(p) == p.dtype:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if key != "step":
                    state[key] = _copy_state(value, p.device)
