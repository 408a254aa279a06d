import copy

import pytest
import torch
import torch.distributed as dist

from lm_opt.optim import EMASGD, SOAP, Adafactor, Adalayer, AdamMini, Lion, Shampoo
from lm_opt.optim.state import BaseOptimizer, check_args, state_dtype


class Nested(BaseOptimizer):
    """A minimal subclass whose state nests tensors in a list, like SOAP's factors."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    def _update_group(self, group, params):
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["moments"] = [torch.zeros_like(p, dtype=state_dtype(p)) for _ in range(2)]
            state["step"] += 1
            state["moments"][0].add_(p.grad.float(), alpha=1e-3)
            p.sub_(group["lr"] * state["moments"][0].to(p.dtype))


def test_state_dtype():
    assert state_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert state_dtype(torch.zeros(1, dtype=torch.float16)) == torch.float32
    assert state_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_load_keeps_nested_fp32_state_of_bf16_params_and_copies_it():
    p = torch.ones(3, dtype=torch.bfloat16)
    opt = Nested([p])
    p.grad = torch.full((3,), 1e-3, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    fresh = p.clone()
    resumed = Nested([fresh])
    resumed.load_state_dict(copy.deepcopy(saved))
    moments = resumed.state[fresh]["moments"]
    assert all(m.dtype == torch.float32 for m in moments)
    # Bit for bit: a bf16 round trip would have rounded 1e-6.
    assert torch.equal(moments[0], opt.state[p]["moments"][0])
    resumed.load_state_dict(saved)
    assert resumed.state[fresh]["moments"][0].data_ptr() != saved["state"][0]["moments"][0].data_ptr()


def test_step_returns_closure_loss_and_refuses_sparse_grads():
    p = torch.zeros(3, requires_grad=True)
    opt = Nested([p])

    def closure():
        loss = (p - 1).square().sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="Nested does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"lr": float("nan")}, "lr"),
        ({"betas": (0.9, 1.0)}, r"betas\[1\]"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_check_args_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}"):
        check_args(**kwargs)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("cls", [Adafactor, Adalayer, AdamMini, SOAP, Shampoo])
def test_optimizers_with_statistics_take_fsdp2_shards_and_refuse_other_layouts_by_name(cls):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        cls([sharded])
        with pytest.raises(RuntimeError, match=f"{cls.__name__} supports DTensor parameters sharded on dim 0"):
            cls([replicated])
        opt = cls([torch.nn.Parameter(torch.randn(4, 4))])
        with pytest.raises(RuntimeError, match=cls.__name__):
            opt.add_param_group({"params": [replicated]})
        assert len(opt.param_groups) == 1
        # Elementwise optimizers take any layout.
        for elementwise in (Lion, EMASGD):
            elementwise([replicated])
    finally:
        if owns_group:
            dist.destroy_process_group()

