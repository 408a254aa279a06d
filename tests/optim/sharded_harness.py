"""Plumbing of the FSDP2 tests of the optimizers with whole-tensor statistics.

A tiny GPT whose dims split unevenly over 2 and 4 ranks (9 vocabulary rows: 3, 3, 3 and an
empty shard on 4 ranks; QKV's 54 rows: 14, 14, 14, 12, so Q, K, V and heads straddle shards),
trained on one process or sharded with `lm_opt.parallel.shard` over gloo ranks.
"""

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed as dist

from lm_opt.model import GPT, ModelConfig, lm_loss
from lm_opt.optim import Adafactor, Adalayer, AdamMini
from lm_opt.optim.adalayer import num_blocks

MODEL = dict(n_layer=1, n_embd=18, n_head=3, vocab_size=9, padded_vocab_multiple=1)
STEPS = 4
# Per optimizer: class, constructor arguments, and extra group keys by role. Two take the
# per-tensor path, the others the foreach one.
OPTIMIZERS = {
    "adafactor": (Adafactor, dict(lr=1e-2), {}),
    "adafactor_full": (Adafactor, dict(lr=1e-2, vector_moment="full", foreach=False), {}),
    "adalayer": (Adalayer, dict(lr=1e-2), {}),
    "frozen_adalayer": (Adalayer, dict(lr=1e-2, freeze_after=2, foreach=False),
                        {"last_layer": {"keep_adapting": True}, "norm": {"keep_adapting": True}}),
    "adam_mini": (AdamMini, dict(lr=1e-2, weight_decay=0.1), {}),
}


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_name("tiny", **MODEL))


def build(name: str, model: GPT) -> torch.optim.Optimizer:
    """The optimizer, with one param group per role and block layout as the routing callback makes."""
    cls, kwargs, by_role = OPTIMIZERS[name]
    roles, groups = model.param_roles(), {}
    for pname, p in model.named_parameters():
        role = roles[pname]
        extra = dict(by_role.get(role, {}))
        if hasattr(cls, "block_layout"):
            extra["blocks"] = cls.block_layout(role, n_head=model.config.n_head, fused=model.fused_projections(pname))
        key = (role, extra.get("blocks"))
        groups.setdefault(key, {"params": [], **extra})["params"].append(p)
    return cls(list(groups.values()), **kwargs)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(step))


def train(model: GPT, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1,
          on_step=contextlib.nullcontext) -> None:
    """Steps on a global batch of 4 sequences, rank r of `world` taking sequences r::world.

    FSDP2 averages the ranks' gradients of their mean losses: the gradient of the global mean.
    """
    for step in steps:
        tokens = batch(step)[rank::world]
        optimizer.zero_grad()
        ce, z = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.config.z_loss)
        (ce + z).backward()
        with on_step():
            optimizer.step()


def factored_3d(distribute=lambda t: t, on_step=contextlib.nullcontext) -> torch.Tensor:
    """A (3, 4, 6) tensor after 3 Adafactor* steps: dim 0 is a batch dim of its factoring, so a
    shard's statistics are local (on 4 ranks the last holds no row)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(distribute(torch.randn(3, 4, 6, generator=gen)))
    optimizer = Adafactor([p], lr=1e-2)
    for _ in range(3):
        p.grad = distribute(torch.randn(3, 4, 6, generator=gen))
        with on_step():
            optimizer.step()
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def full_params(model: GPT) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def reference(name: str, steps: int = STEPS) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer, GPT]:
    """One process: the parameters after `steps` steps, the optimizer and the model."""
    model = make_model()
    optimizer = build(name, model)
    train(model, optimizer, range(steps))
    return full_params(model), optimizer, model


def expected_all_reduce(name: str, step: int) -> list[int]:
    """The elements of each all-reduce of a step, from the optimizers' docstrings.

    Adafactor: c per r x c matrix, 1 per vector with a scalar v. Adalayer and Adam-mini: n per
    tensor of n multi-row blocks, none for row blocks or a frozen v. One all-reduce per group.
    """
    model = make_model()
    cls = OPTIMIZERS[name][0]
    sizes = []
    for group in build(name, model).param_groups:
        if cls is Adafactor:
            full = group["vector_moment"] == "full"
            sizes.append(sum(p.shape[1] if p.ndim == 2 else int(not full) for p in group["params"]))
        else:
            freeze_after = group["freeze_after"]
            frozen = freeze_after is not None and step > freeze_after and not group["keep_adapting"]
            rows = [p.shape[0] for p in group["params"]]
            blocks = [num_blocks(p.shape, group["blocks"]) for p in group["params"]]
            sizes.append(0 if frozen else sum(n for n, r in zip(blocks, rows) if n < r))
    return [s for s in sizes if s]


@contextlib.contextmanager
def counting_all_reduce(counts: list[int]):
    """Append the elements of each `dist.all_reduce` to `counts`, and check with CommDebugMode that
    no other collective runs (none hidden in DTensor ops)."""
    from torch.distributed.tensor.debug import CommDebugMode

    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        counts.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        with CommDebugMode() as comm:
            yield
    finally:
        dist.all_reduce = original
    assert comm.get_total_counts() == len(counts), comm.get_comm_counts()


def state_layout(optimizer: torch.optim.Optimizer, model: GPT) -> dict[str, dict[str, str]]:
    """Per parameter name and state key: the DTensor placements, or "plain"."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: str(tuple(v.placements)) if hasattr(v, "placements") else "plain"
                           for k, v in state.items()} for p, state in optimizer.state.items()}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Per optimizer: an FSDP2 run, its all-reduces per step, and a run resumed at step 2 from a
    full (gathered) state dict into a fresh model and optimizer; rank 0 saves what it found."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh

    from lm_opt.parallel import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = StateDictOptions(full_state_dict=True)
    gathered = StateDictOptions(full_state_dict=True, cpu_offload=True)
    results = {}
    for name in OPTIMIZERS:
        model = shard(make_model(), mesh)
        optimizer = build(name, model)
        counts: list[list[int]] = []

        def on_step():
            counts.append([])
            return counting_all_reduce(counts[-1])

        train(model, optimizer, range(STEPS), rank, world, on_step)

        half = shard(make_model(), mesh)
        half_optimizer = build(name, half)
        train(half, half_optimizer, range(2), rank, world)
        saved = {"model": get_model_state_dict(half, options=gathered),
                 "optim": get_optimizer_state_dict(half, half_optimizer, options=gathered)}
        path = Path(out_dir) / f"{name}-{world}.ckpt"
        if rank == 0:
            torch.save(saved, path)
        dist.barrier()
        saved = torch.load(path)
        gathered_state = copy.deepcopy(saved["optim"]["state"])  # loading aliases its "step" tensors
        resumed = shard(make_model(seed=1), mesh)
        resumed_optimizer = build(name, resumed)
        set_model_state_dict(resumed, saved["model"], options=full)
        set_optimizer_state_dict(resumed, resumed_optimizer, saved["optim"], options=full)
        layouts = (state_layout(half_optimizer, half), state_layout(resumed_optimizer, resumed))
        train(resumed, resumed_optimizer, range(2, STEPS), rank, world)
        results[name] = {"params": full_params(model), "resumed": full_params(resumed), "all_reduce": counts,
                         "layouts": layouts, "gathered": gathered_state}
    from torch.distributed.tensor import Shard, distribute_tensor

    counts = []
    results["factored_3d"] = factored_3d(lambda t: distribute_tensor(t, mesh, [Shard(0)]),
                                         lambda: counting_all_reduce(counts))
    assert counts == []
    if rank == 0:
        torch.save(results, Path(out_dir) / f"results-{world}.pt")
    dist.barrier()  # no rank tears down its gloo pairs while a peer still sends on them
    dist.destroy_process_group()
