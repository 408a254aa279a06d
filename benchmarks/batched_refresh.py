"""Does batching SOAP's eigenbasis refresh by shape pay? A loop over same-shape factors
against one batched call, side by side in one run.

The refresh of one d x d factor is `QR(GG @ Q)` (kronecker.refresh_eigenbasis). A model
has many factors of one shape (the 150m preset: 72 of 1024 x 1024), so the loop could be
one `bmm` and one batched `torch.linalg.qr`. Both orders are timed in alternating rounds.

    python -m benchmarks.batched_refresh --dim 1024 --count 12
"""

import argparse
import statistics
import time

import torch


def loop(factors: list[torch.Tensor], bases: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.linalg.qr(f @ q)[0] for f, q in zip(factors, bases)]


def batched(factors: list[torch.Tensor], bases: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.linalg.qr(torch.bmm(torch.stack(factors), torch.stack(bases)))[0].unbind(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    grads = [torch.randn(args.dim, args.dim, device=args.device) for _ in range(args.count)]
    factors = [g @ g.T for g in grads]
    bases = [torch.linalg.qr(torch.randn_like(f))[0] for f in factors]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    for _ in range(args.rounds):
        for name, fn in (("loop", loop), ("batched", batched)):
            sync()
            start = time.perf_counter()
            fn(factors, bases)
            sync()
            times[name].append(time.perf_counter() - start)
    a, b = (statistics.median(times[k]) for k in ("loop", "batched"))
    print(f"{args.count} factors of {args.dim} x {args.dim} on {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"loop {a * 1e3:.1f} ms, batched {b * 1e3:.1f} ms: batched/loop = {b / a:.2f}")


if __name__ == "__main__":
    main()
