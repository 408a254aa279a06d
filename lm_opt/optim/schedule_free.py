"""Schedule-Free AdamW (Defazio et al. 2024)."""

from collections.abc import Callable, Iterable
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


def warmup_factor(t: int, warmup_steps: int) -> float:
    """Linear warmup of step ``t`` (1-based): ``t / warmup_steps`` up to 1."""
    return min(1.0, t / warmup_steps) if warmup_steps else 1.0


def schedule_free_update(
    y: Tensor,
    grad: Tensor,
    z: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
) -> None:
    """One Schedule-Free AdamW step on one tensor, in place (``y``, ``z``, ``exp_avg_sq``).

    With ``u = g / (sqrt(v / bc2) + eps) + wd y`` and ``c = ckp1``: ``z' = z - lr u``, and,
    since ``y = (1 - beta1) z + beta1 x`` and ``x' = lerp(x, z', c)``, ``y' = lerp(y, z', c)
    - lr (1 - beta1) (1 - c) u``: ``x`` is never stored. ``u`` is not formed either: both
    updates divide ``g`` by the one temporary, the denominator (with ``sqrt(bc2)`` moved
    into the step sizes), so a step costs about what AdamW's does.
    """
    g = grad.to(z.dtype)
    work = y.to(z.dtype)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    scale = bias_correction2**0.5
    denom = exp_avg_sq.sqrt().add_(eps * scale)
    y_step = -lr * (1 - beta1) * (1 - ckp1)
    z.addcdiv_(g, denom, value=-lr * scale)
    if weight_decay:
        z.add_(work, alpha=-lr * weight_decay)
        work.mul_(1 - ckp1 + y_step * weight_decay).add_(z, alpha=ckp1)
    else:
        work.lerp_(z, ckp1)
    work.addcdiv_(g, denom, value=y_step * scale)
    if work is not y:
        y.copy_(work)


def schedule_free_update_foreach(
    ys: list[Tensor],
    grads: list[Tensor],
    zs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    ckp1: float,
    bias_correction2: float,
) -> None:
    """:func:`schedule_free_update` over lists of tensors with ``torch._foreach_*`` kernels."""
    gs = [g.to(z.dtype) for g, z in zip(grads, zs)]
    work = [y.to(z.dtype) for y, z in zip(ys, zs)]
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, value=1 - beta2)
    scale = bias_correction2**0.5
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps * scale)
    y_step = -lr * (1 - beta1) * (1 - ckp1)
    torch._foreach_addcdiv_(zs, gs, denoms, value=-lr * scale)
    if weight_decay:
        torch._foreach_add_(zs, work, alpha=-lr * weight_decay)
        torch._foreach_mul_(work, 1 - ckp1 + y_step * weight_decay)
        torch._foreach_add_(work, zs, alpha=ckp1)
    else:
        torch._foreach_lerp_(work, zs, ckp1)
    torch._foreach_addcdiv_(work, gs, denoms, value=y_step * scale)
    copy_back_(ys, work)


class ScheduleFreeAdamW(BaseOptimizer):
    r"""Schedule-Free AdamW, from "The Road Less Scheduled" (Defazio et al. 2024,
    arXiv:2405.15682), with the arguments of the ``schedulefree`` package's
    ``AdamWScheduleFree``.

    No learning-rate schedule is needed beyond the built-in linear warmup. Three sequences
    are tracked: the base iterate :math:`z`, the average :math:`x` (the weights to evaluate)
    and the interpolation :math:`y` (where gradients are taken). At step :math:`t` with
    gradient :math:`g_t` at :math:`y_t`:

    .. math::
        \gamma_t &= \gamma \min(1, t / \text{warmup\_steps}), \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        z_{t+1} &= z_t - \gamma_t \Big( \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda y_t \Big) \\
        c_{t+1} &= \frac{t^r \, \gamma_{\max,t}^{\,p}}{\sum_{i \le t} i^r \, \gamma_{\max,i}^{\,p}},
            \qquad \gamma_{\max,t} = \max_{i \le t} \gamma_i,
            \quad p = \text{weight\_lr\_power} \\
        x_{t+1} &= (1 - c_{t+1}) \, x_t + c_{t+1} z_{t+1} \\
        y_{t+1} &= (1 - \beta_1) \, z_{t+1} + \beta_1 x_{t+1}

    with :math:`x_1 = y_1 = z_1` the initial parameters. Weight decay is taken at
    :math:`y` and is not normalized by :math:`v`. Like the package, the step count, the
    weight sum and :math:`\gamma_{\max}` live in the param group (a group in which no
    parameter has a gradient does not advance).

    The parameters hold :math:`y` in training and :math:`x` in evaluation: call
    :meth:`eval` before evaluating or checkpointing the weights and :meth:`train` before
    training again, as lm_opt's training loop does (:mod:`lm_opt.optim.hooks`; both are
    idempotent; the mode is kept in the param groups, so it survives ``state_dict``). Unlike
    the package, the optimizer starts in train mode (at that point :math:`x = y`), and
    :meth:`train` restores :math:`y` bit for bit: :meth:`eval` keeps a copy of :math:`y`.

    State: ``z`` and ``exp_avg_sq``, 8 bytes per parameter in float32, like AdamW; in eval
    mode also ``y``, a copy of the parameter in its own dtype. State is float32 for
    bf16/fp16 parameters (the update is computed in float32 and cast back) and float64 for
    float64 ones. The update is elementwise, so sharded parameters (FSDP2 ``DTensor``)
    work as they are.

    Args:
        params: Parameters or parameter groups to optimize.
        lr: Learning rate :math:`\gamma` after warmup.
        betas: :math:`(\beta_1, \beta_2)`: interpolation between :math:`z` and :math:`x`
            for :math:`y`, and EMA coefficient of the second moment.
        eps: Added after the square root.
        weight_decay: Weight decay :math:`\lambda`, applied at :math:`y`.
        warmup_steps: Steps of linear learning-rate warmup.
        r: Power of :math:`t` in the averaging weights.
        weight_lr_power: Power of the (warmed-up) learning rate in the averaging weights.
        foreach: Use the multi-tensor ``torch._foreach_*`` implementation. ``None`` picks it
            when all tensors of a group are on one device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        check_args(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # beta1 = 0 would make y = z and leave x unrecoverable for eval().
        if not betas[0] > 0.0:
            raise ValueError(f"Invalid betas[0]: {betas[0]} (must be in (0, 1))")
        if not (type(warmup_steps) is int and warmup_steps >= 0):
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (must be an int >= 0)")
        if not r >= 0.0:
            raise ValueError(f"Invalid r: {r} (must be >= 0)")
        if not weight_lr_power >= 0.0:
            raise ValueError(f"Invalid weight_lr_power: {weight_lr_power} (must be >= 0)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            foreach=foreach,
            train_mode=True,
            step=0,
            weight_sum=0.0,
            lr_max=0.0,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: Re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or None.

        Raises:
            RuntimeError: In eval mode, where the parameters hold ``x`` rather than ``y``.
        """
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                "ScheduleFreeAdamW.step() called in eval mode (the parameters hold x, not y): "
                "call optimizer.train() before training"
            )
        return super().step(closure)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:
                state["z"] = p.detach().to(state_dtype(p), copy=True)
                state["exp_avg_sq"] = torch.zeros_like(state["z"])
        grads = [p.grad for p in params]
        zs = [self.state[p]["z"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        t = group["step"] + 1
        beta1, beta2 = group["betas"]
        lr = group["lr"] * warmup_factor(t, group["warmup_steps"])
        group["lr_max"] = max(group["lr_max"], lr)
        weight = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
        group["weight_sum"] += weight
        group["step"] = t
        hyper = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            # Zero weights so far (lr = 0) leave x where it is.
            ckp1=weight / group["weight_sum"] if group["weight_sum"] > 0 else 0.0,
            bias_correction2=1 - beta2**t,
        )
        if use_foreach(group, params):
            schedule_free_update_foreach(params, grads, zs, exp_avg_sqs, **hyper)
        else:
            for p, g, z, v in zip(params, grads, zs, exp_avg_sqs):
                schedule_free_update(p, g, z, v, **hyper)

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x`` into the parameters, keeping ``y`` to restore in :meth:`train`."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                state["y"] = p.detach().clone()
                # x = (y - (1 - beta1) z) / beta1, computed in the state's precision.
                work = p.to(state["z"].dtype)
                work.lerp_(state["z"], 1 - 1 / beta1)
                if work is not p:
                    p.copy_(work)
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y`` back into the parameters, exactly as it was before :meth:`eval`."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    p.copy_(state.pop("y"))
            group["train_mode"] = True

    def effective_lr(self, p: Tensor) -> Tensor | None:
        """Per-coordinate ``lr_t / (sqrt(v_hat) + eps)`` from the current state.

        ``lr_t`` is the warmed-up learning rate of the last step and ``v_hat`` the
        bias-corrected second moment, so the last step moved ``z`` by
        ``-effective_lr * grad`` (plus weight decay) if ``lr`` has not changed since.

        Returns:
            A tensor shaped like ``p`` in the state's dtype, or None before ``p``'s first
            step.
        """
        state = self.state.get(p)
        if not state:
            return None
        group = group_of(self, p)
        t = group["step"]
        lr = group["lr"] * warmup_factor(t, group["warmup_steps"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** t)
        return lr / (v_hat.sqrt() + group["eps"])
