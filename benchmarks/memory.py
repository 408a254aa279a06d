"""Peak GPU memory of a training step per preset and micro-batch, measured on CPU and extrapolated.

One training step is forward + loss + backward under bf16 autocast (the GPU's bf16-mixed), then an
AdamW step (foreach: its temporary bounds the configs' fused step). MemTracker (a TorchDispatchMode)
counts every tensor's bytes at the peak, on real small models on CPU. Parameters, gradients and
the two AdamW states are known exactly (16 bytes a parameter); the rest, activations and
temporaries, is fitted linearly in `features` over small measured shapes, checked on a held-out
shape, and cross-checked at each preset's full shape by tracing the same step under
FakeTensorMode (shapes only, no memory). The model runs eagerly: torch.compile (the presets'
default) fuses some of the float32 logits away, so this bounds a compiled run from above.
`benchmarks.gpu_memory` runs the same step on a GPU against this prediction (README: within 1% of
torch.cuda.max_memory_allocated on an H200).

    python -m benchmarks.memory            # fit, checks, the shipped configs' table, the choice
    python -m benchmarks.memory --no-fit   # the tables only, from the stored fit (seconds)
"""

import argparse
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.fx.experimental.proxy_tensor import make_fx

from lm_opt.model import GPT, ModelConfig, lm_loss
from lm_opt.user_yaml import read_yaml

GiB = 2**30
CAPACITY_GIB = 79.6  # an 80 GB H100 or A100 as torch.cuda reports it (81559 MiB)
# The caching allocator's reserved memory exceeds its allocated peak by the free pieces of split
# 2 MiB-rounded segments: 5-15% in LM training, so 10% here. The CUDA context, cuBLAS workspaces,
# NCCL buffers and compiled kernels take memory outside the allocator: about 1.5 GiB on an H100.
FRAGMENTATION = 1.10
CONTEXT_GIB = 1.5
MARGIN = 0.10  # the choice keeps 10% of the card free for what this estimate misses
GLOBAL_BATCH = 256
CONFIGS = Path(__file__).parent.parent / "configs"
PRESET_CONFIGS = ("150m", "300m", "600m", "1.2b")
STRATEGY_CONFIGS = ("ddp", "fsdp")


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    seq_len: int

    def config(self) -> ModelConfig:
        return ModelConfig(n_layer=self.n_layer, n_embd=self.n_embd, n_head=self.n_head,
                           vocab_size=self.vocab_size, block_size=self.seq_len)


# Small shapes spanning depth, width, vocabulary and sequence length; each is measured at two
# micro-batches so the token-proportional part separates from the weight-proportional one.
FIT_SHAPES = (Shape(2, 64, 2, 512, 32), Shape(4, 64, 2, 512, 32), Shape(2, 128, 4, 512, 64),
              Shape(2, 64, 2, 2048, 32), Shape(3, 96, 3, 1024, 64), Shape(1, 32, 1, 1024, 16))
FIT_BATCHES = (2, 6)
HELD_OUT = (Shape(5, 96, 3, 1500, 48), 5)  # deeper, an unpadded vocabulary, a new seq_len


def preset_shape(preset: str, seq_len: int) -> Shape:
    c = ModelConfig.from_name(preset)
    return Shape(c.n_layer, c.n_embd, c.n_head, c.vocab_size, seq_len)


@contextmanager
def cuda_layer_norm_policy():
    """Run LayerNorm in float32 under CPU autocast, as CUDA autocast does (its float32 op list);
    CPU autocast keeps the input's dtype, which would shrink the QK-norm's saved tensors."""
    layer_norm = F.layer_norm

    def float32_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu"):
            x, weight, bias = (t.float() if t is not None else None for t in (x, weight, bias))
        return layer_norm(x, normalized_shape, weight, bias, eps)

    # and attention in bf16, as on a GPU (lm_opt runs it in float32 under CPU autocast, for speed)
    with mock.patch.object(F, "layer_norm", float32_layer_norm), \
            mock.patch("lm_opt.model.float32_attention", lambda x: False):
        yield


def micro_batch(model: GPT, tokens: torch.Tensor) -> None:
    """Forward and loss under bf16 autocast (Lightning's bf16-mixed), backward outside it."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce, z = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.config.z_loss)
    (ce + z).backward()


def peak_above_start(model: GPT, optimizer: torch.optim.Optimizer, fn) -> int:
    """Peak bytes during fn() above those held at its start (parameters, gradients, states)."""
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    (start,) = tracker.get_tracker_snapshot("current").values()
    with tracker:
        fn()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak["Total"] - start["Total"]


def measure(shape: Shape, batch_size: int, checkpointing: bool, fake: bool = False) -> tuple[int, int]:
    """(activation and temporary bytes at the peak of a micro-batch, temporary bytes of the AdamW
    step), in the steady state: optimizer states exist and earlier micro-batches left gradients."""
    with torch.device("meta" if fake else "cpu"):
        model = GPT(shape.config())  # the init's truncation reads values, which fake tensors lack
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext(), cuda_layer_norm_policy():
        if fake:
            model.to_empty(device="cpu")
        model.activation_checkpointing = checkpointing
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        tokens = torch.randint(shape.vocab_size, (batch_size, shape.seq_len + 1))
        micro_batch(model, tokens)
        optimizer.step()  # no zero_grad: the measured micro-batch accumulates, as a later one does
        return (peak_above_start(model, optimizer, lambda: micro_batch(model, tokens)),
                peak_above_start(model, optimizer, optimizer.step))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameters: all, in one block, and outside the blocks (embedding, final norm, output layer)."""
    with torch.device("meta"):
        model = GPT(config)
    total, block = model.num_params(), sum(p.numel() for p in model.blocks[0].parameters())
    return {"total": total, "block": block, "root": total - config.n_layer * block}


def features(shape: Shape, batch_size: int) -> np.ndarray:
    """Block matrices (12 d^2 a block at MLP ratio 4) and the output layer: autocast's bf16 copies
    of them live until backward uses them. Then tokens times n_layer * d (saved per block), d
    (embedding, final norm) and the padded vocabulary (logits in bf16 and float32, their
    gradients). Attention adds no term in seq_len: the flash kernels on GPU and CPU keep O(T) per
    head, not the T x T scores."""
    c = shape.config()
    tokens = batch_size * shape.seq_len
    return np.array([12 * c.n_layer * c.n_embd**2, c.padded_vocab_size * c.n_embd,
                     tokens * c.n_layer * c.n_embd, tokens * c.n_embd, tokens * c.padded_vocab_size],
                    dtype=np.float64)


def fit() -> tuple[dict[bool, np.ndarray], float]:
    """Measure the small shapes and fit: bytes per feature (checkpointing off, on), and the AdamW
    step's temporaries in bytes per parameter (the most over the shapes)."""
    coefficients, temps = {}, []
    for checkpointing in (False, True):
        rows, targets = [], []
        for shape in FIT_SHAPES:
            for batch_size in FIT_BATCHES:
                activations, temp = measure(shape, batch_size, checkpointing)
                rows.append(features(shape, batch_size))
                targets.append(activations)
                temps.append(temp / param_counts(shape.config())["total"])
        coefficients[checkpointing] = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]
    return coefficients, max(temps)


# What `fit()` gives (torch 2.13 on CPU), stored so the table and the test need no minute of
# measuring; the benchmark re-fits and prints both. Without checkpointing a block saves about
# 51 bytes a token per unit of width; with it, its float32 input (4 bytes): the bf16 copies of
# the block matrices are then dropped after forward and recomputed one block at a time.
# The loss saves one float32 log-softmax for its backward: 10 bytes a token per vocabulary entry.
COEFFICIENTS = {False: np.array([2.0, 2.01, 50.68, 5.54, 10.02]), True: np.array([1.74, 2.4, 1.77, 19.4, 9.6])}
ADAMW_TEMP = 4.0  # bytes a parameter: the foreach step's float32 temporary; fused=True has none


def activation_bytes(shape: Shape, batch_size: int, checkpointing: bool, bf16_params: bool = False) -> float:
    """Activations and temporaries at a micro-batch's peak. `bf16_params` (FSDP2's mixed
    precision) drops the autocast copies, counted with the gathered weights instead; its bf16
    residual stream would save less than the float32 one measured, so this bounds it from above."""
    c = COEFFICIENTS[checkpointing].copy()
    if bf16_params:
        c[:2] = 0
    return float(features(shape, batch_size) @ c)


@dataclass(frozen=True)
class Run:
    preset: str
    devices: int
    strategy: str  # single, ddp or fsdp
    batch_size: int
    accumulate: int
    checkpointing: bool
    seq_len: int = 512

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulate * self.devices


def allocated_bytes(run: Run) -> float:
    """Peak bytes the caching allocator hands out on one GPU: the larger of a micro-batch's peak
    (its gradients from earlier micro-batches present) and the optimizer step's."""
    shape = preset_shape(run.preset, run.seq_len)
    n = param_counts(shape.config())
    # Float32 parameters and gradients plus AdamW's two float32 states: 16 bytes a parameter.
    if run.strategy == "fsdp":
        # Sharded over the GPUs; gathered in bf16: the root (kept for backward) and two blocks
        # (the current one and the prefetched next), and a block's and the root's unsharded
        # gradients (bf16, and the block's float32 copy for the reduce-scatter).
        sharded = 16 * n["total"] / run.devices
        gathered = 2 * n["root"] + 2 * 2 * n["block"] + 2 * n["root"] + 6 * n["block"]
        micro = sharded + gathered + activation_bytes(shape, run.batch_size, run.checkpointing, bf16_params=True)
        return max(micro, sharded + ADAMW_TEMP * n["total"] / run.devices)
    # DDP's reducer keeps its own float32 gradient buckets (gradient_as_bucket_view is off).
    static = (16 + (4 if run.strategy == "ddp" else 0)) * n["total"]
    micro = static + activation_bytes(shape, run.batch_size, run.checkpointing)
    return max(micro, static + ADAMW_TEMP * n["total"])


def reserved_gib(run: Run) -> float:
    """The GPU memory the run needs: the allocator's fragmentation, then the CUDA context."""
    return FRAGMENTATION * allocated_bytes(run) / GiB + CONTEXT_GIB


def fits(run: Run, margin: float = 0.0) -> bool:
    return reserved_gib(run) <= (1 - margin) * CAPACITY_GIB


def load_run(*configs: Path) -> Run:
    """The run of a preset config, optionally followed by a strategy config (later keys win)."""
    merged: dict[str, dict] = {}
    for path in configs:
        for section, values in read_yaml(path).items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(values)
    model, data, trainer = merged["model"], merged["data"], merged["trainer"]
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = "fsdp" if strategy["class_path"].endswith("FSDP2Strategy") else strategy["class_path"]
    devices = trainer.get("devices", 1)
    return Run(model["preset"], devices, "single" if devices == 1 else strategy, data["batch_size"],
               trainer.get("accumulate_grad_batches", 1), model.get("activation_checkpointing", False),
               data.get("seq_len", 512))


def shipped_runs() -> list[tuple[str, Run]]:
    """Every preset config alone (one GPU), then with each strategy config (eight GPUs)."""
    runs = [(f"{p}.yaml", load_run(CONFIGS / f"{p}.yaml")) for p in PRESET_CONFIGS]
    runs += [(f"{p}.yaml + {s}.yaml", load_run(CONFIGS / f"{p}.yaml", CONFIGS / f"{s}.yaml"))
             for s in STRATEGY_CONFIGS for p in PRESET_CONFIGS]
    return runs


def choose(preset: str, devices: int, strategy: str, max_batch: int = 64) -> Run:
    """The largest power-of-two micro-batch (up to max_batch) that fits with the margin, without
    activation checkpointing if any does: it costs about a third more compute."""
    for checkpointing in (False, True):
        for batch_size in (b for b in (64, 32, 16, 8, 4, 2, 1) if b <= min(max_batch, GLOBAL_BATCH // devices)):
            run = Run(preset, devices, strategy, batch_size, GLOBAL_BATCH // (devices * batch_size), checkpointing)
            if fits(run, MARGIN):
                return run
    raise ValueError(f"{preset} fits on no micro-batch on {devices} GPUs ({strategy})")


def table(rows: list[tuple[str, Run]]) -> str:
    lines = ["| config | preset | GPUs | strategy | micro-batch | accumulation | act. ckpt | est. peak GiB | "
             "fits 80 GB? | >= 10% free? |", "|" + " --- |" * 10]
    for name, r in rows:
        gib = reserved_gib(r)
        lines.append(f"| {name} | {r.preset} | {r.devices} | {r.strategy} | {r.batch_size} | {r.accumulate} | "
                     f"{'on' if r.checkpointing else 'off'} | {gib:.1f} | {'yes' if fits(r) else 'NO'} | "
                     f"{'yes' if fits(r, MARGIN) else 'no'} |")
    return "\n".join(lines)


def cpu_attention_kernel() -> str:
    """The SDPA kernel CPU runs for the model's causal attention under bf16 autocast."""

    def attention(q: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    graph = make_fx(attention)(torch.randn(1, 2, 16, 8)).graph
    return next(str(n.target) for n in graph.nodes if "scaled_dot_product" in str(n.target))


def check_fit() -> None:
    """Re-fit from measurements, then predict the held-out shape and the presets' full shapes."""
    coefficients, temp = fit()
    print(f"AdamW (foreach) step temporaries: {temp:.2f} bytes a parameter (stored {ADAMW_TEMP})")
    for checkpointing in (False, True):
        print(f"checkpointing {'on ' if checkpointing else 'off'}: fitted bytes per feature "
              f"{np.round(coefficients[checkpointing], 2).tolist()}, stored {COEFFICIENTS[checkpointing].tolist()}")
    shape, batch_size = HELD_OUT
    print(f"\nheld-out {shape}, micro-batch {batch_size}: activations, measured vs predicted (stored fit)")
    for checkpointing in (False, True):
        measured, _ = measure(shape, batch_size, checkpointing)
        predicted = activation_bytes(shape, batch_size, checkpointing)
        print(f"  checkpointing {'on ' if checkpointing else 'off'}: {measured / 2**20:.2f} MiB vs "
              f"{predicted / 2**20:.2f} MiB ({predicted / measured - 1:+.1%})")
    print("\nfull preset shapes at micro-batch 64, traced under FakeTensorMode vs predicted (stored fit)")
    for preset in PRESET_CONFIGS:
        shape = preset_shape(preset, 512)
        for checkpointing in (False, True):
            traced, step_temp = measure(shape, 64, checkpointing, fake=True)
            predicted = activation_bytes(shape, 64, checkpointing)
            print(f"  {preset:>4} checkpointing {'on ' if checkpointing else 'off'}: {traced / GiB:6.2f} GiB vs "
                  f"{predicted / GiB:6.2f} GiB ({predicted / traced - 1:+.1%}); AdamW temporaries "
                  f"{step_temp / param_counts(shape.config())['total']:.2f} bytes a parameter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-fit", action="store_true", help="skip the measurements; only the tables")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; CPU attention kernel: {cpu_attention_kernel()}")
    print(f"estimate = {FRAGMENTATION} x allocated peak (fragmentation) + {CONTEXT_GIB} GiB (CUDA context, "
          f"workspaces, NCCL) against {CAPACITY_GIB} GiB; chosen with {MARGIN:.0%} of it free\n")
    if not args.no_fit:
        check_fit()
    print("\nShipped configs:\n" + table(shipped_runs()))
    chosen = [(f"{p}.yaml", choose(p, 1, "single")) for p in PRESET_CONFIGS]
    for strategy in STRATEGY_CONFIGS:
        # One strategy config serves every preset: the micro-batch that fits the largest.
        batch_size = min(choose(p, 8, strategy, max_batch=32).batch_size for p in PRESET_CONFIGS)
        chosen += [(f"{p}.yaml + {strategy}.yaml", choose(p, 8, strategy, max_batch=batch_size))
                   for p in PRESET_CONFIGS]
    print("\nLargest micro-batch with the margin (global batch 256 x 512):\n" + table(chosen))


if __name__ == "__main__":
    main()
