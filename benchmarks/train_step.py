"""Whole training steps with each optimizer config, side by side: wall clock per step against AdamW's.

The real LightningModule on random tokens (lm_opt.study.step_time), one optimizer config of
`configs/optim/` at a time, in alternating rounds; each round times `steps` steps after `warmup`.
SOAP's and Shampoo's refreshes come every `precondition_frequency` steps, so `steps` should be a
multiple of it (20 by default: two refreshes a round). `--max_precond_dim` sets SOAP's and
Shampoo's, as the CPU study's soap_cpu sweep does (1024: the vocabulary axis unrotated).

    python -m benchmarks.train_step --threads 1 --max_precond_dim 1024 \\
        --configs configs/optim/adamw.yaml configs/optim/soap.yaml configs/optim/shampoo.yaml configs/optim/muon.yaml
"""

import argparse
from functools import partial
from pathlib import Path

import torch

from benchmarks.gpu_throughput import optimizer_init_args
from lm_opt.callbacks import OptimizerCallback
from lm_opt.study.step_time import medians, side_by_side

KRONECKER = ("lm_opt.optim.SOAP", "lm_opt.optim.Shampoo")


def callback(config: Path, max_precond_dim: int | None) -> OptimizerCallback:
    """The OptimizerCallback of an optimizer YAML, with SOAP's and Shampoo's max_precond_dim set."""
    init_args = optimizer_init_args(config)
    optimizer = init_args.get("optimizer")
    if max_precond_dim and optimizer and optimizer["class_path"] in KRONECKER:
        optimizer["init_args"]["max_precond_dim"] = max_precond_dim
    return OptimizerCallback(**init_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, nargs="+", required=True, help="optimizer YAMLs; the first is the "
                                                                                "reference of the ratios")
    parser.add_argument("--max_precond_dim", type=int)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (SOAP's first eigh included)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = {config: partial(callback, config, args.max_precond_dim) for config in args.configs}
    seconds = side_by_side(setups, args.preset, args.precision, args.batch_size, args.seq_len, args.steps,
                           args.warmup, args.rounds)
    step = medians(seconds)
    reference = args.configs[0]
    print(f"{args.preset} preset, batch {args.batch_size} x {args.seq_len}, {args.precision}, {args.threads} threads, "
          f"max_precond_dim {args.max_precond_dim}, torch {torch.__version__}; median of {args.rounds} alternating "
          f"rounds of {args.steps} steps")
    print(f"\n| optimizer config | ms per step | vs {reference.stem} | rounds (ms) |\n| --- | --- | --- | --- |")
    for config, s in step.items():
        rounds = ", ".join(f"{1e3 * x:.0f}" for x in seconds[config])
        print(f"| {config.stem} | {1e3 * s:.0f} | {s / step[reference]:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
