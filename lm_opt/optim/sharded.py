"""Whole-tensor statistics of FSDP2 shards.

FSDP2 (``fully_shard``) makes each parameter a ``DTensor`` sharded on dim 0 over a 1-D mesh,
split as ``torch.chunk`` splits it: ``ceil(rows / world)`` rows per rank, the last ranks holding
fewer or none. A shard holds whole rows, so a statistic over each row is local; one that spans
rows is a sum of per-rank partial sums. The optimizers that need such sums compute them on
their local shards and add them up over the ranks with one all-reduce per param group
(:func:`all_reduce_sums`), so that every rank ends with the statistics of one process.
"""

import sys

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor``, without importing ``torch.distributed.tensor``."""
    # A DTensor can only exist once its module is loaded; importing it here would cost about a
    # second to every process that never shards anything.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def check_row_sharded(param: Tensor, optimizer_name: str) -> None:
    """Raise ``RuntimeError`` for a ``DTensor`` not laid out as FSDP2's (``Shard(0)``, 1-D mesh)."""
    if not is_dtensor(param):
        return
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise RuntimeError(
            f"{optimizer_name} supports DTensor parameters sharded on dim 0 over a 1-D mesh "
            f"(FSDP2's layout), got placements {tuple(param.placements)} on a "
            f"{param.device_mesh.ndim}-D mesh"
        )


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor``, ``t`` itself otherwise.

    Under ``torch.no_grad`` (an optimizer's step) the shard is the DTensor's own storage, so
    in-place updates of it update the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows each of ``world`` ranks holds under ``Shard(0)``: chunks of ``ceil(rows / world)``."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - k * chunk)) for k in range(world)]


def row_offset(param: Tensor) -> int:
    """The global index of the first row that this rank holds of a dim-0 sharded ``param``."""
    mesh = param.device_mesh
    return sum(shard_rows(param.shape[0], mesh.size())[: mesh.get_local_rank()])


def rows_like(param: Tensor, shard: Tensor) -> Tensor:
    """``shard``, whose dim 0 runs over this rank's rows of ``param``, sharded as ``param`` is.

    Returns:
        For a ``DTensor`` ``param``, a ``DTensor`` on its mesh and placement whose dim 0 has
        ``param``'s length (so a gathered state dict has whole rows); else ``shard`` itself.
    """
    if not is_dtensor(param):
        return shard
    from torch.distributed.tensor import DTensor

    shape = torch.Size((param.shape[0], *shard.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    mesh, placements = param.device_mesh, param.placements
    return DTensor.from_local(shard, mesh, placements, shape=shape, stride=stride)


def all_reduce_sums(params: list[Tensor], partials: list[Tensor]) -> list[Tensor]:
    """Each of ``partials`` summed over the ranks of its ``DTensor`` parameter's mesh.

    The partials of parameters on one process group (and of one dtype) are concatenated and
    all-reduced together: one collective for all of them, of as many elements as they hold.
    Every rank must call this with the same parameters, in the same order.
    """
    batches: dict[tuple, list[int]] = {}
    for i, (p, s) in enumerate(zip(params, partials)):
        batches.setdefault((p.device_mesh.get_group(), s.dtype), []).append(i)
    sums = list(partials)
    for (group, _), indices in batches.items():
        flat = torch.cat([partials[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        for i, total in zip(indices, flat.split([partials[i].numel() for i in indices])):
            sums[i] = total.view_as(partials[i])
    return sums
