import copy
import inspect
import io

import pytest
import torch

from lm_opt.optim.adam_mini import AdamMini

N_STEPS = 25
N_HEAD, D, VOCAB = 2, 8, 10
BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
LRS = {"matrix": 1e-2, "other": 3e-3}

# name: (shape, role, fused); the last two get zero grads and no grad.
PARAMS = {
    "wte": ((VOCAB, D), "embedding", 1),
    "qkv": ((3 * D, D), "matrix", 3),
    "proj": ((D, D), "matrix", 1),
    "fc": ((2, 4 * D, D // 2), "matrix", 1),
    "ln": ((D,), "norm", 1),
    "lm_head": ((VOCAB, D), "last_layer", 1),
    "zero_grad": ((4 * D, D), "matrix", 1),
    "no_grad": ((D,), "norm", 1),
}


def paper_partition(shape, role, fused):
    """Adam-mini's blocks as row slices: one per token, per head, per output neuron, or all."""
    if role == "norm":
        return [slice(None)]
    if role == "matrix" and fused > 1:
        size = shape[0] // (fused * N_HEAD)
        return [slice(k * size, (k + 1) * size) for k in range(fused * N_HEAD)]
    return [slice(i, i + 1) for i in range(shape[0])]


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=dtype)
        for name, (shape, _, _) in PARAMS.items()
    }


def make_grads(params, n_steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        grads = {}
        for name, p in params.items():
            row_scale = torch.logspace(-1, 1, p.shape[0], dtype=p.dtype)
            row_scale = row_scale.reshape(-1, *[1] * (p.ndim - 1))
            grads[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype) * row_scale
        grads["zero_grad"] = torch.zeros_like(params["zero_grad"])
        grads["no_grad"] = None
        steps.append(grads)
    return steps


def lr_of(name, t=1):
    """Matrices and the rest run at different lrs under a schedule that changes every step."""
    base = LRS["matrix"] if PARAMS[name][1] == "matrix" else LRS["other"]
    return base / (1 + 0.1 * t)


def make_optimizer(params, **kwargs):
    groups = [
        {
            "params": [p],
            "lr": lr_of(name),
            "blocks": AdamMini.block_layout(PARAMS[name][1], n_head=N_HEAD, fused=PARAMS[name][2]),
        }
        for name, p in params.items()
    ]
    return AdamMini(groups, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kwargs)


def run(opt, params, grad_steps, first_step=1):
    for t, grads in enumerate(grad_steps, start=first_step):
        for group, name in zip(opt.param_groups, params):
            group["lr"] = lr_of(name, t)
        for name, p in params.items():
            g = grads[name]
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()


def reference_adam_mini(p, grads, name):
    """The equations as a plain loop: per-coordinate m, one v per block of the paper's partition."""
    beta1, beta2 = BETAS
    blocks = paper_partition(*PARAMS[name])
    m, v, trajectory = torch.zeros_like(p), [0.0] * len(blocks), []
    for t, g in enumerate(grads, start=1):
        lr = lr_of(name, t)
        m = beta1 * m + (1 - beta1) * g
        denom = torch.empty_like(p)
        for k, rows in enumerate(blocks):
            v[k] = beta2 * v[k] + (1 - beta2) * g[rows].pow(2).mean()
            denom[rows] = (v[k] / (1 - beta2**t)).sqrt() + EPS
        p = p * (1 - lr * WEIGHT_DECAY) - lr * (m / (1 - beta1**t)) / denom
        trajectory.append(p)
    return trajectory


def test_block_layout_follows_the_paper():
    assert AdamMini.block_layout("embedding", n_head=4) == "row"
    assert AdamMini.block_layout("last_layer", n_head=4) == "row"
    assert AdamMini.block_layout("matrix", n_head=4, fused=3) == 12
    assert AdamMini.block_layout("matrix", n_head=4) == "row"
    assert AdamMini.block_layout("norm", n_head=4) == "tensor"
    with pytest.raises(ValueError, match="role"):
        AdamMini.block_layout("bias", n_head=4)


@pytest.mark.parametrize("foreach", [False, True])
def test_matches_reference_equations(foreach):
    params = make_params()
    initial = {name: p.clone() for name, p in params.items()}
    grad_steps = make_grads(params, N_STEPS)
    references = {
        name: reference_adam_mini(initial[name], [grads[name] for grads in grad_steps], name)
        for name in params
        if name != "no_grad"
    }
    opt = make_optimizer(params, foreach=foreach)
    for t, grads in enumerate(grad_steps, start=1):
        run(opt, params, [grads], first_step=t)
        for name, trajectory in references.items():
            torch.testing.assert_close(params[name], trajectory[t - 1], rtol=1e-6, atol=1e-12)

    assert opt.state[params["qkv"]]["exp_avg_sq"].shape == (3 * N_HEAD,)
    assert opt.state[params["lm_head"]]["exp_avg_sq"].shape == (VOCAB,)
    assert torch.equal(params["no_grad"], initial["no_grad"])
    assert params["no_grad"] not in opt.state


def test_defaults_and_no_frozen_mode():
    signature = inspect.signature(AdamMini)
    defaults = {k: v.default for k, v in signature.parameters.items()}
    assert defaults["lr"] == 1e-3
    assert defaults["betas"] == (0.9, 0.95)
    assert defaults["eps"] == 1e-8
    assert defaults["weight_decay"] == 0.1
    assert "freeze_after" not in defaults and "keep_adapting" not in defaults
    with pytest.raises(ValueError, match="freeze_after"):
        AdamMini([{"params": [torch.zeros(3)], "freeze_after": 5}])


def test_foreach_equals_per_tensor():
    runs = []
    for foreach in [False, True]:
        params = make_params(dtype=torch.float32)
        params["proj"] = params["proj"].bfloat16()
        run(make_optimizer(params, foreach=foreach), params, make_grads(params, N_STEPS))
        runs.append(params)
    for name in PARAMS:
        assert torch.equal(runs[0][name], runs[1][name])


def test_state_dict_round_trip_continues_bit_for_bit():
    params = make_params(dtype=torch.float32)
    params["wte"] = params["wte"].bfloat16()
    grad_steps = make_grads(params, 16)
    opt = make_optimizer(params)
    run(opt, params, grad_steps[:8])

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    fresh = {name: copy.deepcopy(p) for name, p in params.items()}
    resumed = make_optimizer(fresh)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state[fresh["wte"]]["exp_avg"].dtype == torch.float32

    run(opt, params, grad_steps[8:], first_step=9)
    run(resumed, fresh, grad_steps[8:], first_step=9)
    for name in PARAMS:
        assert torch.equal(params[name], fresh[name])


def test_bf16_params_keep_fp32_state():
    params = {name: p.bfloat16() for name, p in make_params(dtype=torch.float32).items()}
    opt = make_optimizer(params)
    run(opt, params, make_grads(params, 3))
    for name, p in params.items():
        assert p.dtype == torch.bfloat16
        if name != "no_grad":
            assert {v.dtype for v in opt.state[p].values()} == {torch.float32}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": -1e-3}, "lr"),
        ({"betas": (-0.1, 0.99)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"blocks": "head"}, "blocks"),
        ({"blocks": 4}, "blocks"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdamMini([torch.zeros(6, 2)], **kwargs)
