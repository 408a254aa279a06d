"""Optimizer step time under FSDP2 on 2 CPU processes (gloo) against one process, per optimizer.

The `cpu` preset's model (or another preset's), random gradients, the optimizers with the
routing callback's param groups. One process times `step()` on the whole model; then two
processes, each holding half the rows of every tensor, time it on their shards, collectives
included (a barrier before each step, so a rank's wait for the other is not counted as work).
The median of each is printed with their ratio: below 1 where halving the work outweighs the
communication.

    python -m benchmarks.sharded_step --preset cpu --steps 6
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.optim_step import matrices, routed
from lm_opt.model import GPT, ModelConfig
from lm_opt.optim import SOAP, Adafactor, Adalayer, AdamMini, Lion, Muon, Shampoo, Signum

OPTIMIZERS = {
    "AdamW": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True),
    "Lion": lambda model: Lion(model.parameters(), lr=1e-4),
    "Signum": lambda model: Signum(model.parameters(), lr=1e-4),
    "Adafactor": lambda model: Adafactor(routed(model, Adafactor), lr=1e-3),
    "Adalayer": lambda model: Adalayer(routed(model, Adalayer), lr=1e-3),
    "AdamMini": lambda model: AdamMini(routed(model, AdamMini), lr=1e-3),
    "SOAP": lambda model: SOAP(model.parameters(), lr=1e-3, precondition_frequency=10, max_precond_dim=1024),
    "Shampoo": lambda model: Shampoo(model.parameters(), lr=1e-3, precondition_frequency=10, max_precond_dim=1024),
    "Muon": lambda model: Muon(matrices(model), lr=0.02),  # the hidden matrices only
}


def step_ms(preset: str, steps: int, name: str, world: int = 1) -> float:
    """Median ms of `steps` optimizer steps after 2 untimed ones (SOAP's first builds its bases)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(preset))
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from lm_opt.parallel import shard

        shard(model, init_device_mesh("cpu", (world,)))
    optimizer = OPTIMIZERS[name](model)
    times = []
    for i in range(steps + 2):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def worker(rank: int, init_file: str, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {name: step_ms(args.preset, args.steps, name, world=2) for name in args.optimizers}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process in both runs
    single = {name: step_ms(args.preset, args.steps, name) for name in args.optimizers}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "sharded.pt")
        torch.multiprocessing.spawn(worker, args=(str(Path(tmp) / "init"), out, args), nprocs=2)
        sharded = torch.load(out)
    print(f"{args.preset} preset, torch {torch.__version__}, {os.cpu_count()} cores, 1 thread per process")
    print("| optimizer | 1 process ms | 2 processes (FSDP2) ms | ratio |")
    print("| --- | --- | --- | --- |")
    for name in args.optimizers:
        print(f"| {name} | {single[name]:.1f} | {sharded[name]:.1f} | {sharded[name] / single[name]:.2f} |")


if __name__ == "__main__":
    main()
