"""Measured GPU peak memory of the step that benchmarks/memory.py models, next to its prediction.

benchmarks/memory.py predicts, from CPU measurements, the peak bytes the caching allocator hands
out in one training step (eager model, bf16 autocast, AdamW foreach, the steady state with
gradients and optimizer states present) and the reserved memory a run needs (x1.10 fragmentation
+ 1.5 GiB CUDA context). This runs that same step on the GPU for the shipped single-GPU configs
(and 300m at 64 x 4) and prints, per config:
predicted vs measured allocated peak (torch.cuda.max_memory_allocated), predicted vs measured
reserved (torch.cuda.max_memory_reserved plus the memory outside the allocator: context,
cuBLAS workspaces, as total - free - reserved).

    python -m benchmarks.gpu_memory [--out rows.json]
    python -m benchmarks.gpu_memory --device cpu --smoke    # the plumbing only, on tiny shapes
"""

import argparse
import gc
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.memory import (CONFIGS, GiB, PRESET_CONFIGS, Run, activation_bytes, allocated_bytes, load_run,
                               param_counts, preset_shape, reserved_gib)
from lm_opt.model import GPT, lm_loss


def runs(smoke: bool) -> list[tuple[str, Run]]:
    if smoke:  # a CPU check of this script's plumbing only
        return [("tiny 4 x 1", Run("tiny", 1, "single", 4, 1, False, 32)),
                ("tiny 4 x 1 ckpt", Run("tiny", 1, "single", 4, 1, True, 32))]
    out = []
    for preset in PRESET_CONFIGS:
        out.append((f"{preset}.yaml", load_run(CONFIGS / f"{preset}.yaml")))
        if preset == "300m":
            out.append(("300m 64 x 4", Run("300m", 1, "single", 64, 4, False)))
    return out


def measure(run: Run, device: str, steps: int) -> dict:
    torch.manual_seed(0)
    shape = preset_shape(run.preset, run.seq_len)
    with torch.device(device):  # initialised on the device: a 1.2b init on the CPU takes long
        model = GPT(shape.config())
    model.activation_checkpointing = run.checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(shape.vocab_size, (run.batch_size, run.seq_len + 1), device=device)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            ce, z = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.config.z_loss)
        (ce + z).backward()
        optimizer.step()
        # Gradients stay allocated, as for the later micro-batches of gradient accumulation
        # (the estimate's steady state).
        optimizer.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"loss": float(ce.detach()), "step_s": times}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        reserved_now = torch.cuda.memory_reserved()
        result.update(allocated_peak=torch.cuda.max_memory_allocated(),
                      reserved_peak=torch.cuda.max_memory_reserved(),
                      outside_allocator=total - free - reserved_now, total=total)
    del model, optimizer, tokens, ce, z
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of the plumbing)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; eager GPT, bf16 autocast, AdamW foreach, {args.steps} steps, "
          "gradients kept (steady state)")
    header = (f"{'config':16}{'preset':>7}{'batch':>7}{'ckpt':>5}{'params_M':>10}{'pred_alloc':>11}"
              f"{'meas_alloc':>11}{'err':>8}{'pred_resv':>10}{'meas_resv':>10}{'ctx':>6}{'err':>8}{'step_ms':>9}")
    print("GiB columns; pred_resv = 1.10 x pred_alloc + 1.5; meas_resv = max_memory_reserved + ctx "
          "(memory outside the allocator); err = predicted / measured - 1")
    print(header)
    rows = []
    for label, run in runs(args.smoke):
        shape = preset_shape(run.preset, run.seq_len)
        n = param_counts(shape.config())["total"]
        row = {"config": label, "run": asdict(run), "params": n,
               "predicted_allocated_gib": allocated_bytes(run) / GiB,
               "predicted_activation_gib": activation_bytes(shape, run.batch_size, run.checkpointing) / GiB,
               "predicted_reserved_gib": reserved_gib(run)}
        try:
            row.update(measure(run, args.device, args.steps))
        except torch.OutOfMemoryError as err:
            row["error"] = f"OOM: {str(err).splitlines()[0]}"
        except Exception as err:  # keep going: one failing config must not hide the others
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        if "error" in row:
            print(f"{label:16} {row['error'][:160]}")
            continue
        step_ms = 1e3 * min(row["step_s"][1:] or row["step_s"])
        if "allocated_peak" in row:
            alloc = row["allocated_peak"] / GiB
            ctx = row["outside_allocator"] / GiB
            resv = row["reserved_peak"] / GiB + ctx
            cells = (f"{row['predicted_allocated_gib']:11.2f}{alloc:11.2f}"
                     f"{row['predicted_allocated_gib'] / alloc - 1:+8.1%}{row['predicted_reserved_gib']:10.2f}"
                     f"{resv:10.2f}{ctx:6.2f}{row['predicted_reserved_gib'] / resv - 1:+8.1%}")
        else:
            cells = f"{row['predicted_allocated_gib']:11.4f}{'n/a':>11}{'':8}{row['predicted_reserved_gib']:10.2f}"
        print(f"{label:16}{run.preset:>7}{f'{run.batch_size}x{run.accumulate}':>7}"
              f"{'on' if run.checkpointing else 'off':>5}{n / 1e6:10.1f}{cells}{step_ms:9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
