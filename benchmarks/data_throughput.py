"""Data pipeline throughput: tokens/s one rank's DataModule delivers (streaming, tokenizing and
packing with its DataLoader workers) against the tokens/s training consumes.

    python -m benchmarks.data_throughput [--num_workers 4] [--seq_len 512] [--batch_size 64] [--batches 100]

The defaults are the data settings of configs/150m.yaml; the goal is at least 2x the ~390k tokens/s
that the 150m preset consumes on one H100 at 45% MFU. Runs offline on the embedded corpus and the
embedded tokenizer with T5's layout and size (32000 pieces; both built on first use), not on C4
with t5-base, so the figure depends on this corpus's documents as well as on the machine.

It measures twice in one process: first as lm_opt runs, with no encoding in the main process
before the workers fork; then after the main process has encoded one batch, as setup used to
(tokenizers then keeps every worker on one thread). The second order is forced: that state
cannot be undone in a process.
"""

import argparse
import os
import time

import tokenizers
import torch

from lm_opt.data import STATE_KEY, C4DataModule, tokenize
from lm_opt.provenance import cpu_name

# The estimate of what the 150m preset consumes on one H100 at 45% MFU.
H100_150M_TOKENS_PER_S = 390_000


def delivered_tokens_per_s(dm: C4DataModule, n_batches: int) -> float:
    """Tokens/s of a fresh train loader, after its first batch (worker start-up is paid once)."""
    it = iter(dm.train_dataloader())
    next(it)
    start = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        batch = next(it)
        batch.pop(STATE_KEY)
        tokens += batch["input_ids"][:, 1:].numel()
    return tokens / (time.perf_counter() - start)


def machine() -> str:
    """CPU model, the cores this process may use, and the versions that set the figure."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_name()}, {cores} cores available, torch {torch.__version__}, "
            f"tokenizers {tokenizers.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--consumes", type=float, default=H100_150M_TOKENS_PER_S,
                        help="tokens/s training consumes per rank (default: 150m on one H100 at 45%% MFU)")
    args = parser.parse_args()
    dm = C4DataModule(path="embedded", tokenizer="embedded", seq_len=args.seq_len, batch_size=args.batch_size,
                      num_workers=args.num_workers, val_sequences=8)
    dm.prepare_data()
    dm.setup("fit")
    delivered = delivered_tokens_per_s(dm, args.batches)
    tokenize(dm.tokenizer, ["The main process encodes one batch before its workers fork."] * 64)
    used_before_fork = delivered_tokens_per_s(dm, args.batches)
    setting = f"{args.num_workers} workers, batch {args.batch_size} x {args.seq_len}"
    print(f"machine: {machine()}; TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"| per rank | tokens/s | / {args.consumes:,.0f} consumed |")
    print("| --- | --- | --- |")
    print(f"| DataModule delivers ({setting}) | {delivered:,.0f} | {delivered / args.consumes:.2f}x |")
    print(f"| same, tokenizer used in the main process before the fork | {used_before_fork:,.0f} | "
          f"{used_before_fork / args.consumes:.2f}x |")
    print("| goal | | 2x |")


if __name__ == "__main__":
    main()
