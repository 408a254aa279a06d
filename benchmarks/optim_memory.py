"""Optimizer state memory in bytes per parameter, measured, next to the theoretical value.

Measured: the bytes of every tensor in ``optimizer.state`` after one step, divided by the
number of parameters the optimizer updates. Theoretical: from the state each optimizer documents, on the same
shapes (float32 state: 4 bytes a number). The presets are stepped on the ``meta`` device
(shapes and dtypes without memory or compute) unless ``--device cpu``; ``--check``
steps the tiny preset on both and asserts that they measure the same.

    python -m benchmarks.optim_memory
    python -m benchmarks.optim_memory --presets tiny --device cpu
"""

import argparse
from collections.abc import Callable
from math import prod

import torch
from torch import Tensor
from torch.optim import Optimizer

from benchmarks.optim_step import matrices, routed
from lm_opt.model import GPT, ModelConfig
from lm_opt.optim import (
    EMASGD, SOAP, Adafactor, Adalayer, AdamMini, Lion, Muon, ScheduleFreeAdamW, Shampoo, Signum,
)
from lm_opt.optim.adalayer import num_blocks
from lm_opt.optim.state import state_bytes

MAX_PRECOND_DIM = 10000  # SOAP's and Shampoo's default


def kronecker_numbers(shape: tuple[int, ...]) -> int:
    """SOAP/Shampoo: two moments, plus a d x d factor and a d x d basis (or root) per dim <= 10000."""
    if len(shape) < 2:
        return 2 * prod(shape)
    return 2 * prod(shape) + sum(2 * d * d for d in shape if d <= MAX_PRECOND_DIM)


def adafactor_numbers(shape: tuple[int, ...]) -> int:
    """Adafactor: the first moment, plus a row and a column vector (a full v for vectors)."""
    if len(shape) < 2:
        return 2 * prod(shape)
    return prod(shape) + prod(shape[:-1]) + prod(shape[:-2]) * shape[-1]


def cases(model: GPT) -> dict[str, tuple[Callable[[], Optimizer], Callable[[Tensor, dict], int], str]]:
    """Name -> (optimizer factory, float32 numbers of state for a parameter and its group, nominal)."""
    params = list(model.parameters())
    blocks = lambda p, g: prod(p.shape) + num_blocks(p.shape, g["blocks"])  # noqa: E731
    return {
        "AdamW": (lambda: torch.optim.AdamW(params, foreach=True), lambda p, g: 2 * p.numel(), "8"),
        "SGD (momentum)": (lambda: torch.optim.SGD(params, lr=1.0, momentum=0.98, foreach=True),
                           lambda p, g: p.numel(), "4"),
        "Lion": (lambda: Lion(params), lambda p, g: p.numel(), "4"),
        "Signum": (lambda: Signum(params), lambda p, g: p.numel(), "4"),
        "EMASGD": (lambda: EMASGD(params), lambda p, g: p.numel(), "4"),
        "Adafactor": (lambda: Adafactor(params), lambda p, g: adafactor_numbers(tuple(p.shape)), "about 4"),
        "Adalayer (routed blocks)": (lambda: Adalayer(routed(model, Adalayer)), blocks, "about 4"),
        "AdamMini (routed blocks)": (lambda: AdamMini(routed(model, AdamMini)), blocks, "about 4"),
        "ScheduleFreeAdamW": (lambda: ScheduleFreeAdamW(params), lambda p, g: 2 * p.numel(), "8"),
        "SOAP": (lambda: SOAP(params), lambda p, g: kronecker_numbers(tuple(p.shape)), "more than 8"),
        "Shampoo": (lambda: Shampoo(params), lambda p, g: kronecker_numbers(tuple(p.shape)), "more than 8"),
        "Muon (matrices)": (lambda: Muon(matrices(model)), lambda p, g: p.numel(), "4"),
    }


def measure(preset: str, device: str) -> dict[str, tuple[float, float, str]]:
    """Name -> (measured, theoretical bytes per parameter, nominal)."""
    with torch.device(device):
        model = GPT(ModelConfig.from_name(preset))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
    rows = {}
    for name, (make, numbers, nominal) in cases(model).items():
        opt = make()
        opt.step()
        n = sum(p.numel() for g in opt.param_groups for p in g["params"])
        measured = sum(state_bytes(s) for s in opt.state.values())
        # The "step" counters (torch.optim, Adafactor, Adalayer) are a few bytes per tensor.
        theory = sum(4 * numbers(p, g) for g in opt.param_groups for p in g["params"])
        rows[name] = (measured / n, theory / n, nominal)
        del opt
    return rows


def soap_by_shape(preset: str) -> dict[tuple[int, ...], float]:
    """SOAP's measured state bytes per parameter for each distinct shape of the preset."""
    with torch.device("meta"):
        model = GPT(ModelConfig.from_name(preset))
        for p in model.parameters():
            p.grad = torch.empty_like(p)
    opt = SOAP(model.parameters())
    opt.step()
    return {tuple(p.shape): state_bytes(opt.state[p]) / p.numel() for p in model.parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "150m"])
    parser.add_argument("--device", default="meta", help="meta (no memory, exact sizes) or cpu")
    parser.add_argument("--check", action="store_true", help="assert meta and cpu agree on the tiny preset")
    args = parser.parse_args()
    if args.check:
        assert measure("tiny", "meta") == measure("tiny", "cpu"), "meta and cpu measure differently"
        print("tiny: meta and cpu give the same state bytes\n")
    results = {preset: measure(preset, args.device) for preset in args.presets}
    header = ["optimizer", "nominal"] + [f"{p} measured | {p} theory" for p in args.presets]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * (2 + 2 * len(args.presets)))
    for name in results[args.presets[0]]:
        cells = [f"{results[p][name][0]:.3f} | {results[p][name][1]:.3f}" for p in args.presets]
        print(f"| {name} | {results[args.presets[0]][name][2]} | " + " | ".join(cells) + " |")
    for preset in args.presets:
        shapes = soap_by_shape(preset)
        print(f"\nSOAP (and Shampoo) state by shape, {preset}, bytes per parameter: "
              + ", ".join(f"{'x'.join(map(str, s))}: {b:.2f}" for s, b in shapes.items()))


if __name__ == "__main__":
    main()
