"""Fully sharded data parallel with FSDP2: `fully_shard` per transformer block, then the root.

Each block's parameters become DTensors sharded on dim 0 over the data-parallel mesh, gathered
for its forward and backward and freed after. Under bf16 mixed precision the gathered copies
are bf16 and gradients are reduce-scattered in float32, so the sharded float32 master weights
and optimizer states never see a bf16 rounding.
"""

from typing import Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lm_opt.model import GPT


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with every process on the data-parallel (sharding) axis.

    ModelParallelStrategy's `auto` puts the processes of a node on its tensor-parallel axis; the
    LM has no tensor parallelism, so here `auto` means one data-parallel axis of all processes.
    Checkpoints are gathered into one file on rank 0 by default (`save_distributed_checkpoint:
    false`), so they load anywhere; set it true to write one shard per rank instead.
    """

    def __init__(self, data_parallel_size: int | Literal["auto"] = "auto", save_distributed_checkpoint: bool = False,
                 process_group_backend: str | None = None):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 compute with float32 gradient reduction under `bf16-mixed`; float32 otherwise."""
    if precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision.startswith("16"):
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model: GPT, mesh: DeviceMesh, precision: str = "32-true",
          reshard_after_forward: bool | Literal["auto"] = True) -> GPT:
    """Shard `model` in place: one FSDP2 unit per block, and the root (embedding, final norm,
    output layer) as the last. Parameter names are unchanged, so routing and roles still hold."""
    policy = mixed_precision(precision)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters are used last in forward and first in backward: keep them gathered.
    return fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

