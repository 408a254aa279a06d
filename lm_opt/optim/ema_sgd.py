"""SGD with bias-corrected EMA momentum: Adam with the second moment fixed at 1."""

import torch
from torch.optim import Optimizer


def ema_sgd_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, step: int, lr: float,
                   momentum: float, weight_decay: float) -> None:
    """m = b m + (1 - b) g;  p <- p (1 - lr wd) - lr m / (1 - b^t)."""
    exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - momentum)
    update = exp_avg / (1 - momentum**step)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


class EMASGD(Optimizer):
    """The body optimizer of the study's "SGD + Adalayer on the last layer and LayerNorm":
    Adam's first moment with bias correction and v fixed at 1,

        m_t = beta m_{t-1} + (1 - beta) g_t,   p_t = p_{t-1} - lr m_t / (1 - beta^t).

    Unlike `torch.optim.SGD(momentum, dampening=momentum)`, whose buffer starts at g_1, every
    step is the bias-corrected EMA, so the lr is on the same scale as Adam's update.
    Decoupled weight decay `p *= 1 - lr wd`. State: `exp_avg`, 4 bytes per parameter (fp32,
    also for bf16 parameters). Elementwise, so it works on sharded (DTensor) parameters as is.
    """

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0):
        if lr < 0:
            raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
        if not 0 <= momentum < 1:
            raise ValueError(f"Invalid momentum: {momentum} (must be in [0, 1))")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                    state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                ema_sgd_update(p, p.grad, state["exp_avg"], state["step"], group["lr"], group["momentum"],
                               group["weight_decay"])
        return loss
