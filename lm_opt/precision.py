"""`trainer.precision: auto`: bf16 autocast where the hardware computes in bf16 natively, float32
elsewhere, and the arithmetic a CPU run's record must name to be compared or reused.

Which signal predicts a fast bf16 was measured (docs/training.md, "Precision"): on a CPU the bf16
matmul is fast exactly where oneDNN has bf16 kernels, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
(AVX-512 BF16 or AMX). With oneDNN held to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) a 2048x256 @ 256x1024
bf16 matmul ran at 6 GFLOP/s against float32's 96 on one core, while `_is_avx512_bf16_supported()`
still said True; with ATen held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`) `get_cpu_capability()` said
AVX2 while oneDNN's AMX kernels ran bf16 at 402. A real AVX2-only EPYC reports all three False.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

log = logging.getLogger("lm_opt")

AUTO = "auto"
ARITHMETIC_KEYS = ("capability", "avx512_bf16", "amx", "bf16_native")
"""What decides a CPU run's rounding beyond its packages and threads: runs agree bit for bit only
where these agree (and the CPU model: oneDNN picks kernels per microarchitecture)."""


@dataclass(frozen=True)
class Choice:
    precision: str
    """What Lightning runs: `bf16-mixed`, `32-true`, ..."""
    reason: str
    """Why, for the run's record."""


def cpu_arithmetic() -> dict[str, Any]:
    """The CPU's instruction sets as torch uses them: ATen's kernels (`capability`), the bf16
    instructions (`avx512_bf16`, `amx`) and whether oneDNN computes bf16 natively (`bf16_native`)."""
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx": torch.cpu._is_amx_tile_supported(),
            "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def describe(arithmetic: dict[str, Any] | None) -> str:
    """A CPU kind in words, e.g. `AVX512 + AMX (native bf16)`; `unknown` for a record without it."""
    if not arithmetic or arithmetic.get("capability") is None:
        return "unknown"
    extras = [name for name, key in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")) if arithmetic.get(key)]
    native = "native bf16" if arithmetic.get("bf16_native") else "bf16 emulated"
    return " + ".join([arithmetic["capability"], *extras]) + f" ({native})"


def same_kind(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in ARITHMETIC_KEYS)


def device_type(accelerator: Any) -> str:
    """`cpu` or `cuda` for Lightning's `trainer.accelerator` (a name or an Accelerator)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name in (None, AUTO):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith(("gpu", "cuda")) else "cpu" if name.startswith("cpu") else name


def native_bf16(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device == "cpu" and cpu_arithmetic()["bf16_native"]


def resolve(requested: Any, accelerator: Any) -> Choice:
    """`auto` becomes `bf16-mixed` where the device computes bf16 natively and `32-true` elsewhere
    (not 16-mixed: fp16's loss scaling changes what an optimizer sees); anything else is kept."""
    device = device_type(accelerator)
    if requested != AUTO:
        return Choice(str(requested) if requested is not None else "32-true", "as configured")
    if native_bf16(device):
        return Choice("bf16-mixed", f"auto: {device} computes bf16 natively")
    return Choice("32-true", f"auto: {device} has no native bf16 (emulated bf16 is many times slower)")


def matmul_rate(shapes: list[tuple[int, int, int]], dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of the (M, K) @ (K, N) matmuls of `shapes` done in turn, repeated for `seconds`
    (after one untimed pass)."""
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in pairs:
        a @ b
    start, passes = time.perf_counter(), 0
    while passes == 0 or time.perf_counter() - start < seconds:
        for a, b in pairs:
            a @ b
        passes += 1
    return flops * passes / (time.perf_counter() - start)


def matmul_rates(seconds: float = 0.1) -> dict[str, float]:
    """GFLOP/s of a (2048x256) @ (256x1024) matmul in float32 and bf16 on this CPU (the model's shapes)."""
    return {str(dtype).removeprefix("torch."): matmul_rate([(2048, 256, 1024)], dtype, seconds) / 1e9
            for dtype in (torch.float32, torch.bfloat16)}


def warn_if_emulated(choice: Choice, device: str) -> None:
    """Tell a user who asked for bf16 on a device without it, once, before any compute, what it costs."""
    if "bf16" not in choice.precision or native_bf16(device):
        return
    if device == "cpu":
        rates = matmul_rates()
        cost = (f"bf16 matmuls run at {rates['bfloat16']:.0f} GFLOP/s on this CPU against float32's "
                f"{rates['float32']:.0f} ({describe(cpu_arithmetic())})")
    else:
        cost = f"{torch.cuda.get_device_name()} emulates bf16"
    log.warning(f"trainer.precision={choice.precision}: {cost}; `--trainer.precision auto` (or 32-true) "
                "trains in float32 here, many times faster")


PrecisionInput = _PRECISION_INPUT | Literal["auto"] | None


class Trainer(L.Trainer):
    """Lightning's Trainer with `precision: auto` (`resolve`); `precision_choice` says what ran and why."""

    def __init__(self, *args, precision: PrecisionInput = None, **kwargs):
        self.precision_choice = resolve(precision, kwargs.get("accelerator", AUTO))
        warn_if_emulated(self.precision_choice, device_type(kwargs.get("accelerator", AUTO)))
        super().__init__(*args, precision=self.precision_choice.precision, **kwargs)
