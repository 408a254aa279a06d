"""SOAP, Shampoo and Muon on FSDP2 shards (the owner scheme) against one process, on CPU gloo ranks."""

import contextlib
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from lm_opt.optim import SOAP, Muon, Shampoo

pytestmark = pytest.mark.slow

STEPS, RESUME_AT = 5, 3
# precondition_frequency 2: SOAP refreshes its bases after updates 2 and 4, Shampoo recomputes
# its roots at steps 1, 3 and 5. Weight decay on, so that SOAP's skipped first step shows.
# Muon takes the matrices only, and applies its weight decay before the update.
OPTIMIZERS = {
    "soap": lambda params, max_precond_dim: SOAP(params, lr=3e-3, weight_decay=0.1, precondition_frequency=2,
                                                 max_precond_dim=max_precond_dim),
    "shampoo": lambda params, max_precond_dim: Shampoo(params, lr=3e-3, weight_decay=0.1, precondition_frequency=2,
                                                       max_precond_dim=max_precond_dim),
    "muon": lambda params, max_precond_dim: Muon(params, lr=0.02, weight_decay=0.1),
}


def taken(name: str, params) -> list:
    """The parameters the optimizer takes: Muon the matrices, the others every tensor."""
    return [p for p in params if name != "muon" or p.dim() == 2]


def make_optimizer(name: str, params, world: int) -> torch.optim.Optimizer:
    """On 2 ranks, whose gradient reduction (g0 + g1) / 2 is one process's to the bit, in float32
    and with every factor. 4 ranks sum in another order than one process: then in float64 and,
    for SOAP, only the factors of the smaller dims (``max_precond_dim`` n_embd), which are
    nonsingular. A factor of a few tokens' gradients on the larger dim is singular: ``eigh``
    picks the basis of its null space from rounding, and Adam in that basis (not invariant to
    its rotation) turns any last-bit difference of the gradient into a different step.
    """
    max_precond_dim = 10000 if world == 2 or name == "shampoo" else CONFIG["n_embd"]
    return OPTIMIZERS[name](taken(name, params), max_precond_dim)


def dtype(world: int) -> torch.dtype:
    return torch.float32 if world == 2 else torch.float64
# 90 rows: 45 + 45 on 2 ranks, 23 + 23 + 23 + 21 on 4.
CONFIG = dict(n_layer=1, n_embd=32, vocab_size=90, padded_vocab_multiple=1)
# Loose tensors for 4 ranks: (3,) and (5, 3) leave the last rank no rows.
LOOSE_SHAPES = [(5, 3), (3,), (7, 6)]


def make_model(world: int, sharded: bool, seed: int = 0) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    from lm_opt.model import GPT, ModelConfig
    from lm_opt.parallel import shard

    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_name("tiny", **CONFIG)).to(dtype(world))
    return shard(model, init_device_mesh("cpu", (world,))) if sharded else model


def train(model, optimizer, steps: range, world: int, rank: int | None = None) -> None:
    """Each global batch of 4 sequences in ``world`` parts: rank r takes part r and FSDP2
    averages the gradients; one process (``rank`` None) accumulates every part's loss / world."""
    from lm_opt.model import lm_loss

    parts = range(world) if rank is None else [rank]
    for step in steps:
        tokens = torch.randint(0, CONFIG["vocab_size"], (8, 17), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        for part in parts:
            rows = tokens[part * 8 // world:(part + 1) * 8 // world]
            ce, z = lm_loss(model(rows[:, :-1]), rows[:, 1:], model.config.z_loss)
            ((ce + z) / len(parts)).backward()
        optimizer.step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@contextlib.contextmanager
def counting_all_to_all(rank: int):
    """Elements this rank sends to other ranks through ``all_to_all_single``."""
    sent = [0]
    real = dist.all_to_all_single

    def count(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        sent[0] += sum(input_split_sizes) - input_split_sizes[rank]
        return real(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    with mock.patch.object(dist, "all_to_all_single", count):
        yield sent


def loose_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in LOOSE_SHAPES]


def loose_grad(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + step))


def resume(name: str, world: int, rank: int, out: Path) -> dict[str, torch.Tensor]:
    """RESUME_AT steps, a full checkpoint as Lightning's FSDP2 strategy writes it, then the
    rest of the run on a fresh model and optimizer loaded from it on every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = make_model(world, sharded=True)
    optimizer = make_optimizer(name, model.parameters(), world)
    train(model, optimizer, range(RESUME_AT), world, rank)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ckpt = {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if rank == 0:
        torch.save(ckpt, out / f"{name}.ckpt")
    dist.barrier()
    ckpt = torch.load(out / f"{name}.ckpt")
    model = make_model(world, sharded=True, seed=1)
    optimizer = make_optimizer(name, model.parameters(), world)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=options)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=options)
    train(model, optimizer, range(RESUME_AT, STEPS), world, rank)
    return full_params(model)


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out, results = Path(out_dir), {}
    for name in OPTIMIZERS:
        model = make_model(world, sharded=True)
        optimizer = make_optimizer(name, model.parameters(), world)
        sent = []
        for step in range(STEPS):
            with counting_all_to_all(rank) as count:
                train(model, optimizer, range(step, step + 1), world, rank)
            sent.append(count[0])
        total = torch.tensor(sent)
        dist.all_reduce(total)
        for k, p in enumerate(taken(name, model.parameters())):  # the state lives on the owner alone
            assert (set(optimizer.state[p]) == {"owner"}) == (k % world != rank), (name, k, rank)
        results[name] = {"params": full_params(model), "sent": total.tolist()}
        if world == 2:
            results[name]["resumed"] = resume(name, world, rank, out)

        mesh = model.wte.weight.device_mesh
        loose = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in taken(name, loose_tensors())]
        optimizer = make_optimizer(name, loose, world)
        for step in range(STEPS):
            for p in loose:
                p.grad = distribute_tensor(loose_grad(step, p.shape), mesh, [Shard(0)])
            optimizer.step()
        results[name]["loose"] = [p.full_tensor() for p in loose]
    if rank == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()  # no rank tears down its gloo pairs while a peer still sends on them
    dist.destroy_process_group()


def reference(name: str, world: int) -> dict:
    """The same runs in this process, on plain tensors."""
    torch.set_num_threads(1)
    model = make_model(world, sharded=False)
    train(model, make_optimizer(name, model.parameters(), world), range(STEPS), world)
    loose = [torch.nn.Parameter(t) for t in taken(name, loose_tensors())]
    optimizer = make_optimizer(name, loose, world)
    for step in range(STEPS):
        for p in loose:
            p.grad = loose_grad(step, p.shape)
        optimizer.step()
    return {"params": full_params(model), "loose": [p.detach() for p in loose]}


def expected_sent(name: str, world: int) -> list[int]:
    """The docstrings' figure, per step: every tensor gathered to its owner (round-robin in
    parameter order) but the owner's own ``torch.chunk`` rows, and as many sent back with the
    step size to each other rank."""
    shapes = [p.shape for p in taken(name, make_model(world, sharded=False).parameters())]
    gathered = 0
    for k, shape in enumerate(shapes):
        chunks = torch.arange(shape[0]).chunk(world)
        own_rows = len(chunks[k % world]) if k % world < len(chunks) else 0
        gathered += shape.numel() - own_rows * shape.numel() // shape[0]
    scattered = gathered + len(shapes) * (world - 1)
    first = gathered if name == "soap" else gathered + scattered  # SOAP's first step moves nothing
    return [first] + [gathered + scattered] * (STEPS - 1)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def sharded_run(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"world{world}")
    torch.multiprocessing.spawn(worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world)
    return world, torch.load(tmp / "results.pt")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_sharded_run_matches_one_process(sharded_run, name):
    """FSDP2's averaged gradients differ from the accumulated ones by float32 summation order."""
    world, results = sharded_run
    single = reference(name, world)
    for param, value in single["params"].items():
        torch.testing.assert_close(results[name]["params"][param], value, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {param}: {m}")
    for sharded, plain in zip(results[name]["loose"], single["loose"]):
        torch.testing.assert_close(sharded, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_elements_communicated_per_step_are_the_docstring_figure(sharded_run, name):
    world, results = sharded_run
    assert results[name]["sent"] == expected_sent(name, world)
    if world == 2:  # every dim 0 divides by 2: (W - 1) r c / W each way
        params = taken(name, make_model(world, sharded=False).parameters())
        numel, n_params = sum(p.numel() for p in params), len(params)
        assert results[name]["sent"][1] == 2 * (world - 1) * numel // world + n_params * (world - 1)


@pytest.mark.parametrize("sharded_run", [2], indirect=True, ids=["2ranks"])  # the workers resume on 2
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resumed_from_full_checkpoint_equals_uninterrupted(sharded_run, name):
    world, results = sharded_run
    for param, value in results[name]["params"].items():
        assert torch.equal(results[name]["resumed"][param], value), f"{name}: {param}"
