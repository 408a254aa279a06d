"""CPU training against this machine's matmul rates: tokens/s, model FLOP/s and where a step's time goes.

In one process, side by side: the float32 and bf16 matmul rates at the preset's shapes (every
training matmul of one step: each Linear's forward, input-gradient and weight-gradient
products), then the real LightningModule and fused AdamW on random tokens for each precision
and compile setting a CPU user can pick, in alternating rounds, then a torch.profiler split of
one step per setting into matmuls, attention, norms, the loss, the optimizer step (with
clipping), casts, other ops and the time outside any op (Python, Lightning's loop, autograd's
engine). Each throughput is printed as a fraction of the matmul rate of its precision.

    python -m benchmarks.cpu_train                      # the `cpu` preset, 16 x 128, torch's threads
    python -m benchmarks.cpu_train --threads 1 --settings 32-true bf16-mixed+compile
"""

import argparse
import platform
import statistics
from collections import defaultdict

import torch

from lm_opt.callbacks import OptimizerCallback
from lm_opt.module import LMModule
from lm_opt.precision import matmul_rate
from lm_opt.study.step_time import StepWindow, train_steps

ADAMW = {"class_path": "torch.optim.AdamW",
         "init_args": {"lr": 3.16e-3, "betas": [0.9, 0.95], "eps": 1e-15, "weight_decay": 0.0, "fused": True}}
SETTINGS = ["32-true", "32-true+compile", "bf16-mixed", "bf16-mixed+compile", "bf16-true", "bf16-true+compile"]
"""Lightning precision, `+compile` for `model.compile: true`. bf16-true keeps the weights and
AdamW's state in bf16 (no float32 master copy): listed for completeness, not for the study."""
# Profile categories. Lightning runs forward and backward inside AdamW's step (as its closure), so
# the benchmark marks them: what lies outside both marks is the optimizer step and clipping. Inside,
# a name on an event's path claims its whole subtree (a node's backward), checked from the root;
# then the event's own op name decides.
MARKS = ("cpu_train.forward", "cpu_train.backward")
PYTHON = "Python, Lightning, autograd (outside ops)"
SUBTREE = [("loss", ("_LMLoss",)), ("attention", ("ScaledDotProduct", "scaled_dot_product")),
           ("norms", ("LayerNorm", "layer_norm"))]
LEAF = [("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn", "aten::linear")),
        ("loss", ("log_softmax", "gather", "scatter")), ("casts", ("aten::to", "aten::_to_copy", "aten::copy_")),
        ("compiled kernels (fused)", ("cpp_fused", "CompiledFxGraph", "CompiledFunction"))]
CATEGORIES = ["matmuls", "attention", "norms", "loss", "optimizer + clipping", "casts",
              "compiled kernels (fused)", "other ops", PYTHON]


def matmul_shapes(module: LMModule, tokens: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of each matmul of one training step: per Linear, y = x W^T, dx = dy W, dW = dy^T x."""
    shapes = []
    for linear in module.model.modules():
        if isinstance(linear, torch.nn.Linear):
            k, n = linear.in_features, linear.out_features
            shapes += [(tokens, k, n), (tokens, n, k), (n, tokens, k)]
    return shapes


def fit(setting: str, args: argparse.Namespace, steps: int, profile_steps: int = 0) -> StepWindow:
    """`warmup + steps` training steps of the preset on random tokens with fused AdamW, forward and
    backward marked for the profile."""
    precision, _, compiled = setting.partition("+")
    torch.manual_seed(0)
    module = LMModule(preset=args.preset, compile=bool(compiled))
    module.training_step = marked(module.training_step, MARKS[0])
    module.backward = marked(module.backward, MARKS[1])
    return train_steps(module, precision, OptimizerCallback(optimizer=ADAMW), args.batch_size, args.seq_len,
                       args.warmup, steps, profile_steps)


def category(event) -> str:
    path, node = [], event
    while node is not None:
        path.append(node.name)
        node = node.cpu_parent
    if event.name in MARKS or event.name.startswith("Optimizer."):
        return PYTHON  # these scopes' own time: the Python between their ops
    if not any(name in MARKS for name in path):
        return "optimizer + clipping" if any(name.startswith("Optimizer.") for name in path) else "other ops"
    for name in reversed(path):
        for label, patterns in SUBTREE:
            if any(p in name for p in patterns):
                return label
    for label, patterns in LEAF:
        if any(p in event.name for p in patterns):
            return label
    return "other ops"


def marked(method, mark: str):
    """`method` under a profiler mark."""
    def run(*args, **kwargs):
        with torch.profiler.record_function(mark):
            return method(*args, **kwargs)
    return run


def breakdown(setting: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step by category, from a profile of `--profile_steps` steps."""
    if "compile" in setting:
        torch._inductor.config.cpp.enable_kernel_profile = True  # named fused kernels in the profile
    window = fit(setting, args, args.profile_steps, profile_steps=args.profile_steps)
    seconds: dict[str, float] = defaultdict(float)
    for event in window.profiler.events():
        seconds[category(event)] += event.self_cpu_time_total / 1e6
    wall = window.end - window.start
    seconds[PYTHON] += max(0.0, wall - sum(seconds.values()))
    return {k: seconds[k] / args.profile_steps for k in CATEGORIES} | {"step": wall / args.profile_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    parser.add_argument("--matmul_seconds", type=float, default=2.0, help="per dtype and round")
    parser.add_argument("--profile_steps", type=int, default=3, help="0 skips the profile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.batch_size * args.seq_len
    module = LMModule(preset=args.preset)
    flops_per_token = module.model.flops_per_token(args.seq_len)
    shapes = matmul_shapes(module, tokens)
    rates: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    speed: dict[str, list[float]] = {s: [] for s in args.settings}
    for round_ in range(args.rounds):
        # Alternate the order each round: a shared CPU's speed drifts (other jobs, heat).
        for dtype in list(rates)[:: 1 if round_ % 2 == 0 else -1]:
            rates[dtype].append(matmul_rate(shapes, dtype, args.matmul_seconds))
        for setting in args.settings[:: 1 if round_ % 2 == 0 else -1]:
            speed[setting].append(tokens / fit(setting, args, args.steps).seconds_per_step)
    rate = {dtype: statistics.median(r) for dtype, r in rates.items()}
    print(f"{args.preset} preset, batch {args.batch_size} x {args.seq_len}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{flops_per_token / 1e6:.1f} MFLOP per token; medians of {args.rounds} alternating rounds")
    print(f"matmul rate at the model's shapes: float32 {rate[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rate[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    print("\n| setting | tokens/s | model GFLOP/s | fraction of the matching matmul rate |\n| --- | --- | --- | --- |")
    for setting, runs in speed.items():
        tps = statistics.median(runs)
        matching = rate[torch.float32 if setting.startswith("32") else torch.bfloat16]
        print(f"| {setting} | {tps:,.0f} | {tps * flops_per_token / 1e9:.0f} | {tps * flops_per_token / matching:.2f} |")
    if not args.profile_steps:
        return
    split = {s: breakdown(s, args) for s in args.settings}
    print(f"\nms per step under torch.profiler ({args.profile_steps} steps; the profiler slows small ops)\n")
    print("| | " + " | ".join(split) + " |\n| --- |" + " --- |" * len(split))
    for key in [*CATEGORIES, "step"]:
        print(f"| {key} | " + " | ".join(f"{row[key] * 1e3:.0f}" for row in split.values()) + " |")


if __name__ == "__main__":
    main()
