import functools

import pytest
import torch
from optim_harness import (
    assert_all_equal,
    assert_foreach_equals_per_tensor,
    assert_invalid_hyperparameter_raises,
    resume_from_state_dict,
    run_scheduled,
)

from lm_opt.optim.schedule_free import ScheduleFreeAdamW

N_STEPS = 25
BASE_LRS = [1e-2, 3e-3]
WEIGHT_DECAYS = [0.05, 0.0]
BETAS = (0.9, 0.99)
EPS = 1e-8
WARMUP_STEPS, R, WEIGHT_LR_POWER = 5, 0.5, 2.0


def make_params(dtype=torch.float64, seed=0):
    """Two groups: 1-D, 2-D and 3-D tensors, one with zero grads and one with no grad."""
    gen = torch.Generator().manual_seed(seed)
    group_a = [torch.randn(s, generator=gen, dtype=dtype) for s in [(7,), (5, 3), (2, 3, 4)]]
    group_b = [torch.randn(s, generator=gen, dtype=dtype) for s in [(4, 6), (3,), (2, 2)]]
    return group_a, group_b


def make_grads(params, n_steps, seed=1):
    """Per step, the gradient of each parameter: random, zeros for the 5th, None for the last."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        grads[4], grads[5] = torch.zeros_like(params[4]), None
        steps.append(grads)
    return steps


def lr_factor(t):
    """A schedule that rewrites group["lr"] every step; the optimizer must follow it."""
    return 1.0 / (1 + 0.05 * t)


def make_optimizer(group_a, group_b, **kwargs):
    return ScheduleFreeAdamW(
        [
            {"params": group_a},
            {"params": group_b, "lr": BASE_LRS[1], "weight_decay": WEIGHT_DECAYS[1]},
        ],
        lr=BASE_LRS[0],
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAYS[0],
        warmup_steps=WARMUP_STEPS,
        r=R,
        weight_lr_power=WEIGHT_LR_POWER,
        **kwargs,
    )


def run(opt, params, grad_steps, first_step=1):
    run_scheduled(opt, params, grad_steps, BASE_LRS, lr_factor, first_step)


def reference_schedule_free(p, grads, base_lr, weight_decay):
    """The paper's z, x, y sequences as a plain loop; returns (y, x, effective lr) per step."""
    beta1, beta2 = BETAS
    z, x, y, v = p.clone(), p.clone(), p.clone(), torch.zeros_like(p)
    lr_max, weight_sum, trajectory = 0.0, 0.0, []
    for t, g in enumerate(grads, start=1):
        lr = base_lr * lr_factor(t) * min(1.0, t / WARMUP_STEPS)
        v = beta2 * v + (1 - beta2) * g**2
        effective_lr = lr / ((v / (1 - beta2**t)).sqrt() + EPS)
        lr_max = max(lr_max, lr)
        weight = t**R * lr_max**WEIGHT_LR_POWER
        weight_sum += weight
        c = weight / weight_sum
        z = z - effective_lr * g - lr * weight_decay * y
        x = (1 - c) * x + c * z
        y = (1 - beta1) * z + beta1 * x
        trajectory.append((y, x, effective_lr))
    return trajectory


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_equations(foreach):
    group_a, group_b = make_params()
    params = group_a + group_b
    initial = [p.clone() for p in params]
    grad_steps = make_grads(params, N_STEPS)
    references = [
        reference_schedule_free(
            p0, [grads[i] for grads in grad_steps], BASE_LRS[i // 3], WEIGHT_DECAYS[i // 3]
        )
        for i, p0 in enumerate(initial[:-1])
    ]
    opt = make_optimizer(group_a, group_b, foreach=foreach)
    for t, grads in enumerate(grad_steps, start=1):
        run(opt, params, [grads], first_step=t)
        for p, trajectory in zip(params, references):
            y, _, effective_lr = trajectory[t - 1]
            torch.testing.assert_close(p, y, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(opt.effective_lr(p), effective_lr, rtol=1e-6, atol=0)

    y_final = [p.clone() for p in params]
    opt.eval()
    for p, trajectory in zip(params, references):
        torch.testing.assert_close(p, trajectory[-1][1], rtol=1e-6, atol=1e-12)
    opt.train()
    assert all(torch.equal(p, y) for p, y in zip(params, y_final))

    untouched = params[-1]
    assert torch.equal(untouched, initial[-1])
    assert untouched not in opt.state
    assert opt.effective_lr(untouched) is None


def test_train_and_eval_are_idempotent_and_exact():
    group_a, group_b = make_params(dtype=torch.float32)
    group_a[0] = group_a[0].bfloat16()
    params = group_a + group_b
    opt = make_optimizer(group_a, group_b)
    initial = [p.clone() for p in params]
    opt.eval()  # before any step x = y: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(params, initial))
    opt.train()
    run(opt, params, make_grads(params, 6))
    y = [p.clone() for p in params]

    opt.eval()
    x = [p.clone() for p in params]
    assert not torch.equal(x[1], y[1])
    opt.eval()
    assert all(torch.equal(p, q) for p, q in zip(params, x))
    opt.train()
    opt.train()
    assert all(torch.equal(p, q) for p, q in zip(params, y))


def test_step_in_eval_mode_raises():
    group_a, group_b = make_params()
    params = group_a + group_b
    opt = make_optimizer(group_a, group_b)
    run(opt, params, make_grads(params, 2))
    opt.eval()
    with pytest.raises(RuntimeError, match=r"eval mode.*train\(\)"):
        opt.step()


def test_foreach_equals_per_tensor():
    def run_with(foreach):
        group_a, group_b = make_params(dtype=torch.float32)
        group_a[1] = group_a[1].bfloat16()
        params = group_a + group_b
        opt = make_optimizer(group_a, group_b, foreach=foreach)
        run(opt, params, make_grads(params, N_STEPS))
        opt.eval()
        return params

    assert_foreach_equals_per_tensor(run_with)


@pytest.mark.parametrize("save_in_eval_mode", [False, True])
def test_state_dict_round_trip_continues_bit_for_bit(save_in_eval_mode):
    group_a, group_b = make_params(dtype=torch.float32)
    group_a[0] = group_a[0].bfloat16()
    params = group_a + group_b
    grad_steps = make_grads(params, 16)
    opt = make_optimizer(group_a, group_b)
    run(opt, params, grad_steps[:8])
    if save_in_eval_mode:
        opt.eval()

    resumed, fresh_a, fresh_b = resume_from_state_dict(opt, group_a, group_b, make_optimizer)
    assert resumed.state[fresh_a[0]]["z"].dtype == torch.float32
    assert resumed.param_groups[0]["train_mode"] is not save_in_eval_mode
    opt.train()
    resumed.train()

    run(opt, params, grad_steps[8:], first_step=9)
    run(resumed, fresh_a + fresh_b, grad_steps[8:], first_step=9)
    assert_all_equal(params, fresh_a + fresh_b)


def test_bf16_params_keep_fp32_state():
    group_a, group_b = ([p.bfloat16() for p in group] for group in make_params(torch.float32))
    params = group_a + group_b
    opt = make_optimizer(group_a, group_b)
    run(opt, params, make_grads(params, 3))
    opt.eval()
    for p in params[:-1]:
        assert p.dtype == torch.bfloat16
        state = opt.state[p]
        assert state["z"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert state["y"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (0.0, 0.99)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"r": -1.0}, "r"),
        ({"weight_lr_power": -1.0}, "weight_lr_power"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    make = functools.partial(ScheduleFreeAdamW, [torch.zeros(3)])
    assert_invalid_hyperparameter_raises(make, kwargs, rf"Invalid {name}\b")


def test_step_returns_closure_loss():
    p = torch.ones(3, requires_grad=True)
    opt = ScheduleFreeAdamW([p])

    def closure():
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
