"""What an optimizer asks of the training loop, by its optional methods (lm_opt.optim.hooks)."""

import torch

from lm_opt.optim import Adalayer, AdamMini, CompositeOptimizer, ScheduleFreeAdamW, hooks


def params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(2, 2)) for _ in range(n)]


def test_the_hold_is_the_longest_freeze_behind_a_composite_and_0_without_one():
    frozen = CompositeOptimizer([Adalayer(params(1), freeze_after=3), Adalayer(params(1), freeze_after=5)])
    assert hooks.hold_steps([frozen]) == 5
    assert hooks.hold_steps([Adalayer(params()), AdamMini(params()), torch.optim.AdamW(params())]) == 0


def test_modal_optimizers_switch_behind_a_composite_and_others_are_left_alone():
    schedule_free, adamw = ScheduleFreeAdamW(params(1)), torch.optim.AdamW(params(1))
    composite = CompositeOptimizer([schedule_free, adamw])
    hooks.set_mode([composite], training=False)
    assert not schedule_free.param_groups[0]["train_mode"]
    hooks.set_mode([composite], training=True)
    assert schedule_free.param_groups[0]["train_mode"]
    assert hooks.inner([composite]) == [schedule_free, adamw]
