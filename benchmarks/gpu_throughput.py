"""Training throughput of a preset on one GPU: tokens/s, MFU, peak memory and where a step's time goes.

Runs the real LightningModule and optimizer routing (bf16-mixed, compiled) on random tokens, so
the data pipeline is left out (benchmarks/data_throughput.py measures that). Each optimizer runs
in turn in one process, set up as its `configs/optim/<name>.yaml` sets it up (routes included);
the first `--warmup` steps (compilation, SOAP's first eigendecomposition) are not timed. The
step is split with CUDA events, which do not stall the GPU, into forward + backward (batch start
to the optimizer's pre-step hook) and optimizer step (the rest).

    python -m benchmarks.gpu_throughput --preset 150m --optimizers adamw soap shampoo muon
    python -m benchmarks.gpu_throughput --preset tiny --device cpu --steps 4   # a smoke run anywhere

The study reports about 300k tokens/s per H100 for its 150m model.
"""

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from lm_opt.callbacks import OptimizerCallback
from lm_opt.callbacks.optimizer import optimizer_args
from lm_opt.callbacks.throughput import dense_peak_flops
from lm_opt.module import LMModule
from lm_opt.study.step_time import RandomTokens
from lm_opt.user_yaml import read_yaml

OPTIM_CONFIGS = Path(__file__).parents[1] / "configs" / "optim"
OPTIMIZERS = sorted(p.stem for p in OPTIM_CONFIGS.glob("*.yaml"))


def optimizer_init_args(config: Path) -> dict:
    """The OptimizerCallback's init_args in an optimizer YAML (`configs/optim/*.yaml`): what
    `fit --config` would train with."""
    return optimizer_args(read_yaml(config), str(config))


class StepTimer(L.Callback):
    """Events at each batch's start, before each optimizer step and at each batch's end."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.marks: list[tuple[str, torch.cuda.Event | float]] = []

    def _mark(self, trainer: L.Trainer, what: str) -> None:
        if trainer.global_step < self.warmup:
            return
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        self.marks.append((what, event))

    def on_train_batch_start(self, trainer, *_):
        self._mark(trainer, "start")

    def on_before_optimizer_step(self, trainer, *_):
        self._mark(trainer, "step")

    def on_train_batch_end(self, trainer, *_):
        self._mark(trainer, "end")

    def seconds(self) -> dict[str, list[float]]:
        """Per optimizer step: forward + backward (all micro-batches) and the optimizer step."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            elapsed = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
        else:
            elapsed = lambda a, b: b - a  # noqa: E731
        out: dict[str, list[float]] = {"forward_backward": [], "optimizer": [], "total": []}
        start = step_at = None
        for what, event in self.marks:
            if what == "start" and start is None:
                start = event  # the first micro-batch of an optimizer step
            elif what == "step":
                step_at = event
            elif what == "end" and step_at is not None:
                out["forward_backward"].append(elapsed(start, step_at))
                out["optimizer"].append(elapsed(step_at, event))
                out["total"].append(elapsed(start, event))
                start = step_at = None
        return out


def run(preset: str, optimizer: str, args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    arch = {"vocab_size": args.vocab_size} if args.vocab_size else None
    module = LMModule(preset=preset, arch=arch, compile=args.compile,
                      activation_checkpointing=args.activation_checkpointing)
    steps = args.warmup + args.steps
    data = RandomTokens(module.config.vocab_size, args.batch_size, args.seq_len, steps * args.accumulate)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=steps,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[OptimizerCallback(**optimizer_init_args(OPTIM_CONFIGS / f"{optimizer}.yaml")), timer],
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    times = timer.seconds()
    step_s = statistics.median(times["total"])
    tokens_per_s = args.batch_size * args.seq_len * args.accumulate / step_s
    device = trainer.strategy.root_device
    peak = get_available_flops(device, torch.bfloat16 if "bf16" in args.precision else torch.float32)
    peak = peak or ("bf16" in args.precision and dense_peak_flops(device)) or None
    mfu = module.model.flops_per_token(args.seq_len) * tokens_per_s / peak if peak else float("nan")
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"tokens/s": tokens_per_s, "MFU": mfu, "peak_GiB": memory, "step_ms": 1e3 * step_s,
            "fwd_bwd_ms": 1e3 * statistics.median(times["forward_backward"]),
            "optimizer_ms": 1e3 * statistics.median(times["optimizer"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "soap"], choices=OPTIMIZERS,
                        help="names of configs/optim/*.yaml")
    parser.add_argument("--vocab_size", type=int, help="override the preset's vocabulary (the tokens are random)")
    parser.add_argument("--batch_size", type=int, default=64, help="micro-batch, sequences")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=12, help="untimed steps (compile, SOAP's first refresh)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--activation_checkpointing", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.preset} on {name}: micro-batch {args.batch_size} x {args.seq_len}, accumulation "
          f"{args.accumulate}, {args.precision}, compile {args.compile}, torch {torch.__version__}")
    rows = {opt: run(args.preset, opt, args) for opt in args.optimizers}
    columns = list(next(iter(rows.values())))
    width = max(map(len, ["optimizer", *rows])) + 1
    print(f"{'optimizer':{width}}" + "".join(f"{c:>14}" for c in columns))
    for opt, row in rows.items():
        cells = (f"{row[c]:14,.0f}" if c == "tokens/s" else f"{row[c]:14.3f}" if c in ("MFU", "peak_GiB")
                 else f"{row[c]:14.1f}" for c in columns)
        print(f"{opt:{width}}" + "".join(cells))


if __name__ == "__main__":
    main()
