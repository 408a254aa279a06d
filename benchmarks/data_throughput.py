"""Data pipeline throughput: tokens/s the DataModule delivers (streaming, tokenizing and packing
with its DataLoader workers) against the tokens/s training consumes on the tiny preset.

    python -m benchmarks.data_throughput [--batches 200] [--num_workers 2]

Runs on the embedded corpus and tokenizer (built on first use), as the quickstart does.
"""

import argparse
import time

from benchmarks.loop_overhead import bare_steps_per_s, random_batches
from lm_opt.data import STATE_KEY, C4DataModule


def delivered_tokens_per_s(dm: C4DataModule, n_batches: int) -> float:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per token
    start = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        batch = next(it)
        batch.pop(STATE_KEY)
        tokens += batch["input_ids"][:, 1:].numel()
    return tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    dm = C4DataModule(path="embedded", tokenizer="embedded", seq_len=args.seq_len, batch_size=args.batch_size,
                      num_workers=args.num_workers, val_sequences=8)
    dm.prepare_data()
    dm.setup("fit")
    delivered = delivered_tokens_per_s(dm, args.batches)
    batches = random_batches(30, args.batch_size, args.seq_len)
    consumed = bare_steps_per_s(batches, 30, 5) * args.batch_size * args.seq_len
    print("| | tokens/s |")
    print("| --- | --- |")
    print(f"| DataModule delivers ({args.num_workers} workers) | {delivered:,.0f} |")
    print(f"| tiny training consumes (batch {args.batch_size} x {args.seq_len}) | {consumed:,.0f} |")
    print(f"| ratio | {delivered / consumed:.1f}x |")


if __name__ == "__main__":
    main()
