"""The owner scheme: optimizers whose update needs the whole tensor, on FSDP2 shards.

A parameter sharded on dim 0 (a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh, as
:func:`lm_opt.parallel.shard` makes them) gets one owner rank: round-robin over the
optimizer's sharded parameters in their order, so every rank agrees without talking.
Each step one ``all_to_all`` gathers every gradient whole to its owner, which computes the
update with the state that it alone holds, as one process would; a second ``all_to_all``
returns to each rank its rows of the update, and every rank applies its own rows.

Rank ``k`` holds rows ``[k s, (k + 1) s)`` of an ``r``-row tensor, ``s = ceil(r / W)`` on
``W`` ranks (``torch.chunk``; the last ranks may hold fewer or none). For an ``r x c``
matrix the owner receives every row but its own, ``(W - 1) r c / W`` elements when ``W``
divides ``r``, and sends as many back, with the step size to each other rank (``W - 1``
numbers).
"""

import functools
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lm_opt.optim.sharded import is_dtensor, shard_rows
from lm_opt.optim.state import BaseOptimizer, state_dtype


def apply_update_(
    param: Tensor, update: Tensor, step_size: float, lr: float, weight_decay: float, decay_first: bool
) -> None:
    """``p <- (p - step_size * update) * (1 - lr * weight_decay)``, computed in ``update``'s dtype.

    Weight decay comes after the step, as in the SOAP reference code, or where
    ``decay_first`` before it, as ``torch.optim.Muon`` applies it:
    ``p <- p * (1 - lr * weight_decay) - step_size * update``.
    """
    work = param.to(update.dtype)
    if decay_first and weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    work.add_(update, alpha=-step_size)
    if not decay_first and weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    if work is not param:
        param.copy_(work)


def all_to_all(
    send: list[list[Tensor]],
    shapes: list[list[torch.Size]],
    group: Any,
    dtype: torch.dtype,
    device: torch.device,
) -> list[list[Tensor]]:
    """Send ``send[j]`` to rank ``j``; returns from each rank ``j`` tensors of ``shapes[j]``.

    One ``all_to_all_single`` over the flattened, concatenated tensors, whatever their number.
    """
    flat = [torch.cat([t.reshape(-1).to(dtype) for t in ts]) if ts else None for ts in send]
    flat = [torch.zeros(0, dtype=dtype, device=device) if t is None else t for t in flat]
    sizes = [s.numel() for s in chain.from_iterable(shapes)]
    out = torch.empty(sum(sizes), dtype=dtype, device=device)
    dist.all_to_all_single(
        out,
        torch.cat(flat),
        output_split_sizes=[sum(s.numel() for s in ss) for ss in shapes],
        input_split_sizes=[t.numel() for t in flat],
        group=group,
    )
    pieces = iter(out.split(sizes))
    return [[next(pieces).view(s) for s in ss] for ss in shapes]


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class OwnerOptimizer(BaseOptimizer):
    """An optimizer that computes one whole tensor's update at a time, sharded or not.

    A subclass writes :meth:`_direction`, the update of a tensor from its full gradient and
    its state. A plain tensor takes it where it is; a sharded one (see the module) takes it
    on its owner, the only rank with state for it beyond ``{"owner": rank}``.

    ``state_dict`` of sharded parameters is a collective: every rank must call it together,
    and it returns on every rank the owners' states (on the CPU); ``load_state_dict`` keeps
    of a full state dict the entries that this rank owns. A checkpoint that
    ``torch.distributed.checkpoint.state_dict`` gathers (``full_state_dict=True``) thus holds
    every owner's state; it is tested to resume on as many ranks as wrote it.
    """

    sharding_scheme = "owner: whole gradient gathered to one rank per tensor, update scattered"
    first_step_updates = True
    """False where the first step only builds state (SOAP): non-owners then skip it too."""
    decay_first = False
    """Whether weight decay scales the parameter before the update (Muon) or after (SOAP)."""

    def _direction(
        self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, float] | None:
        """Advance ``state`` by the whole gradient ``grad``; return ``(update, step_size)``.

        None where the step moves nothing (a first step that only builds state).
        """
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group; a sharded parameter must be ``Shard(0)`` on the one 1-D mesh."""
        super().add_param_group(param_group)
        sharded = [p for p in self._params() if is_dtensor(p)]
        for p in sharded:
            if (
                p.device_mesh.ndim != 1
                or p.device_mesh != sharded[0].device_mesh
                or [pl.dim if pl.is_shard() else None for pl in p.placements] != [0]
            ):
                self.param_groups.pop()
                raise ValueError(
                    f"{type(self).__name__} takes DTensor parameters sharded on dim 0 over "
                    f"one 1-D mesh; got placements {p.placements} on {p.device_mesh}"
                )

    def _params(self) -> Iterator[Tensor]:
        return chain.from_iterable(g["params"] for g in self.param_groups)

    def _owners(self) -> dict[Tensor, int]:
        """Owner rank of each sharded parameter: round-robin in parameter order."""
        sharded = [p for p in self._params() if is_dtensor(p)]
        return {p: k % p.device_mesh.size() for k, p in enumerate(sharded)}

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            if not is_dtensor(p):
                direction = self._direction(self.state[p], p.grad.to(state_dtype(p)), group)
                if direction is not None:
                    apply_update_(p, *direction, group["lr"], group["weight_decay"], self.decay_first)
        sharded = [p for p in params if is_dtensor(p)]
        if sharded:
            self._owner_step(group, sharded)

    def _owner_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """Gather each gradient to its owner, update there, send each rank its rows back."""
        mesh = params[0].device_mesh
        world, rank, comm = mesh.size(), mesh.get_local_rank(), mesh.get_group()
        device = params[0].grad.to_local().device
        dtype = functools.reduce(torch.promote_types, (state_dtype(p) for p in params))
        owners = self._owners()
        owner = [owners[p] for p in params]
        rows = [shard_rows(p.shape[0], world) for p in params]
        moves = [self.first_step_updates or bool(self.state[p]) for p in params]
        mine = [i for i, o in enumerate(owner) if o == rank]

        grads = [p.grad.to_local() for p in params]
        send = [[g for g, o in zip(grads, owner) if o == j] for j in range(world)]
        shapes = [[torch.Size((rows[i][j], *params[i].shape[1:])) for i in mine] for j in range(world)]
        received = all_to_all(send, shapes, comm, dtype, device)
        updates, step_sizes = {}, {}
        for k, i in enumerate(mine):
            p = params[i]
            grad = torch.cat([received[j][k] for j in range(world)]).to(state_dtype(p))
            direction = self._direction(self.state[p], grad, group)
            if (direction is not None) != moves[i]:
                raise RuntimeError(f"{type(self).__name__}: first_step_updates is wrong")
            if direction is not None:
                updates[i], step_sizes[i] = direction[0].split(rows[i]), direction[1]
        for p, o in zip(params, owner):
            self.state[p]["owner"] = o

        # Each rank's rows of the updates, then their step sizes: applied as one process
        # applies them, so that equal gradients give equal parameters to the bit.
        sizes = torch.tensor(list(step_sizes.values()), dtype=dtype, device=device)
        send = [[updates[i][j] for i in updates] + [sizes] for j in range(world)]
        moved = [[i for i, o in enumerate(owner) if o == j and moves[i]] for j in range(world)]
        shapes = [
            [torch.Size((rows[i][rank], *params[i].shape[1:])) for i in ids] + [torch.Size((len(ids),))]
            for ids in moved
        ]
        received = all_to_all(send, shapes, comm, dtype, device)
        for ids, (*pieces, sizes) in zip(moved, received):
            for i, update, step_size in zip(ids, pieces, sizes.tolist()):
                local = params[i].to_local()
                apply_update_(local, update, step_size, group["lr"], group["weight_decay"], self.decay_first)

    def state_dict(self) -> dict[str, Any]:
        """The state dict, with every sharded parameter's state from its owner (a collective)."""
        state_dict = super().state_dict()
        owners = self._owners()
        if not owners:
            return state_dict
        mesh = next(iter(owners)).device_mesh
        rank = mesh.get_local_rank()
        mine = {
            index: _to_cpu(state_dict["state"][index])
            for index, p in enumerate(self._params())
            if owners.get(p) == rank and index in state_dict["state"]
        }
        gathered = [None] * mesh.size()
        dist.all_gather_object(gathered, mine, group=mesh.get_group())
        for entries in gathered:
            state_dict["state"].update(entries)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full state dict, keeping of sharded parameters only the states this rank owns."""
        owners = self._owners()
        state = dict(state_dict["state"])
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for key, p in zip(saved_ids, self._params()):
            if p in owners and key in state:
                if owners[p] == p.device_mesh.get_local_rank():
                    state[key] = {**state[key], "owner": owners[p]}
                else:
                    state[key] = {"owner": owners[p]}
        super().load_state_dict({**state_dict, "state": state})
