"""The study's learning-rate schedule and run-length arithmetic, as pure functions."""

import math

from lm_opt.errors import UserError


def lr_factor(step: int, total_steps: int, warmup: float = 0.1, min_ratio: float = 0.1, hold_steps: int = 0) -> float:
    """Multiplier of the peak lr at `step` (0-based).

    After `hold_steps` steps at 0 (an optimizer's hold, lm_opt.optim.hooks: Frozen Adalayer's
    accumulation phase), a linear warmup from `min_ratio` to 1 over `warmup` (a fraction of the
    remaining steps, or a step count if >= 1), then cosine decay to `min_ratio` at the last step,
    as in the study.
    """
    if step < hold_steps:
        return 0.0
    step, total = step - hold_steps, max(total_steps - hold_steps, 1)
    warmup_steps = int(warmup) if warmup >= 1 else int(warmup * total)
    if step < warmup_steps:
        return min_ratio + (1 - min_ratio) * step / warmup_steps
    progress = min((step - warmup_steps) / max(total - 1 - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_max_steps(
    *,
    max_steps: int,
    max_tokens: int | None,
    tokens_per_param: float | None,
    num_params: int,
    tokens_per_step: int,
) -> int:
    """Steps of a run given as steps, as tokens, or as tokens per parameter (20 = Chinchilla).

    At most one of `max_tokens` and `tokens_per_param` may be set; either overrides `max_steps`.
    """
    if max_tokens is not None and tokens_per_param is not None:
        raise UserError("set at most one of model.max_tokens and model.tokens_per_param")
    if max_tokens is None and tokens_per_param is None:
        if max_steps is None or max_steps < 1:
            raise UserError(
                f"trainer.max_steps={max_steps}: set a positive trainer.max_steps, model.max_tokens or "
                "model.tokens_per_param (the LR schedule needs the run length)"
            )
        return max_steps
    tokens = max_tokens if max_tokens is not None else tokens_per_param * num_params
    if tokens <= 0:
        raise UserError(f"the run length must be positive, got {tokens} tokens")
    return max(1, math.ceil(tokens / tokens_per_step))
