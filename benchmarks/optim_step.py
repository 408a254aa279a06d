"""Optimizer step time on the parameter shapes of a model preset, relative to AdamW.

Two tables. The first steps every elementwise or block optimizer on the whole parameter
set of the preset (random gradients), interleaved round-robin so that they share the
machine's load, and gives the median ms per step and the ratio to
``torch.optim.AdamW(fused=True)``; lm_opt's optimizers run both eager (foreach) and with
``fused=True`` (``torch.compile``; its first step, compilation included, is listed). The second times the matmul-bound optimizers (SOAP,
Shampoo, Muon) on one tensor of each distinct shape, next to AdamW on that tensor: the
plain step, the refresh step (SOAP: power iteration + QR; Shampoo: eigh-based inverse
roots), the amortized step over ``precondition_frequency`` = 10, and SOAP's one-time
``eigh`` (its first step), each separately; its last row sums the shapes over the model.

    python -m benchmarks.optim_step --preset tiny
    python -m benchmarks.optim_step --preset 150m
"""

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from lm_opt.model import GPT, ModelConfig
from lm_opt.optim import (
    EMASGD, SOAP, Adafactor, Adalayer, AdamMini, Lion, Muon, ScheduleFreeAdamW, Shampoo, Signum,
)
from lm_opt.optim.routing import Route, param_groups

FREQUENCY = 10  # precondition_frequency of SOAP and Shampoo
REFERENCE = "AdamW (fused)"  # the row the first table's ratios divide by

Factory = Callable[[list[Tensor]], Optimizer]


def build_model(preset: str, device: str = "cpu", seed: int = 0) -> GPT:
    """The preset's model with a random gradient (std 1e-2) on every parameter."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(ModelConfig.from_name(preset))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
    return model


def routed(model: GPT, cls: type) -> list[dict]:
    """Param groups with the block layouts routing gives ``cls``."""
    route = Route(optimizer={"class_path": f"lm_opt.optim.{cls.__name__}"})
    return param_groups(model, list(model.named_parameters()), route, cls)


def matrices(model: GPT) -> list[Tensor]:
    """The 2-D hidden matrices (role "matrix"): what Muon is meant for."""
    roles = model.param_roles()
    return [p for name, p in model.named_parameters() if roles[name] == "matrix"]


def elementwise_optimizers(model: GPT) -> dict[str, Callable[[], Optimizer]]:
    """The optimizers of the first table, on the whole model, with the study's settings."""
    params = list(model.parameters())
    return {
        REFERENCE: lambda: torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True),
        "AdamW (foreach)": lambda: torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0,
                                                     foreach=True),
        "SGD (momentum 0.98, foreach)": lambda: torch.optim.SGD(params, lr=1.0, momentum=0.98, foreach=True),
        "Lion": lambda: Lion(params, lr=3e-4, betas=(0.9, 0.95)),
        "Lion (fused)": lambda: Lion(params, lr=3e-4, betas=(0.9, 0.95), fused=True),
        "Signum": lambda: Signum(params, lr=3e-4, momentum=0.95),
        "Signum (fused)": lambda: Signum(params, lr=3e-4, momentum=0.95, fused=True),
        "Adafactor": lambda: Adafactor(params, lr=3e-3, betas=(0.9, 0.95)),
        "Adalayer (routed blocks)": lambda: Adalayer(routed(model, Adalayer), lr=3e-3, betas=(0.9, 0.95)),
        "Adalayer (routed blocks, fused)": lambda: Adalayer(routed(model, Adalayer), lr=3e-3, betas=(0.9, 0.95),
                                                            fused=True),
        "AdamMini (routed blocks)": lambda: AdamMini(routed(model, AdamMini), lr=3e-3, weight_decay=0.0),
        "EMASGD": lambda: EMASGD(params, lr=1.0, momentum=0.9),
        "EMASGD (fused)": lambda: EMASGD(params, lr=1.0, momentum=0.9, fused=True),
        "ScheduleFreeAdamW": lambda: ScheduleFreeAdamW(params, lr=3e-3, betas=(0.9, 0.95)),
    }


def kronecker_optimizers() -> dict[str, Factory]:
    """The matmul-bound optimizers of the second table, as factories on a parameter list."""
    return {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=True),
        "SOAP": lambda ps: SOAP(ps, weight_decay=0.0, precondition_frequency=FREQUENCY),
        "Shampoo": lambda ps: Shampoo(ps, precondition_frequency=FREQUENCY),
        "Muon": lambda ps: Muon(ps, lr=0.02, weight_decay=0.0),
    }


def round_robin(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall-clock and CPU seconds of each callable, called in turn ``repeats`` times.

    CPU time (``time.process_time``, all threads of this process) is the steadier measure
    where other processes share the cores: it does not count time spent waiting for them.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def time_model(
    model: GPT, repeats: int, steps_per_sample: int
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Median wall-clock and CPU ms per step of each elementwise optimizer on the whole model,
    and the wall-clock seconds of each one's first two steps (state, and compilation where
    ``fused``: the second step, with a new lr, must not recompile)."""
    optimizers = {name: make() for name, make in elementwise_optimizers(model).items()}
    first_steps = {}
    for name, opt in optimizers.items():
        start = time.perf_counter()
        opt.step()  # allocates the state (and compiles), outside the timing
        for group in opt.param_groups:
            group["lr"] *= 0.5
        opt.step()
        first_steps[name] = time.perf_counter() - start

    def sample(opt: Optimizer) -> Callable[[], None]:
        def run() -> None:
            for _ in range(steps_per_sample):
                opt.step()
        return run

    medians = round_robin({name: sample(opt) for name, opt in optimizers.items()}, repeats)
    rows = {name: (1e3 * w / steps_per_sample, 1e3 * c / steps_per_sample) for name, (w, c) in medians.items()}
    return rows, first_steps


def forced_step(opt: Optimizer, p: Tensor, step: int | None) -> Callable[[], None]:
    """``opt.step()`` as ``p``'s step number ``step`` (None: its first step, fresh state).

    SOAP's first step builds the factors and their ``eigh`` bases; it refreshes the bases
    after the update when ``step % f == 0``. Shampoo recomputes its inverse roots (an
    ``eigh`` of each factor) before the update when ``(step - 1) % f == 0``.
    """
    def run() -> None:
        if step is None:
            opt.state.clear()
        else:
            opt.state[p]["step"] = step - 1
        opt.step()
    return run


def time_shape(shape: tuple[int, ...], is_matrix: bool, repeats: int, eigh_repeats: int) -> dict[str, float]:
    """Wall-clock ms of each column of the second table for one tensor of ``shape``."""
    make = kronecker_optimizers()
    names = ["AdamW", "SOAP", "Shampoo"] + (["Muon"] if is_matrix else [])
    params = {name: torch.randn(shape) for name in names}
    opts = {}
    for name, p in params.items():
        p.grad = torch.randn(shape) * 1e-2
        opts[name] = make[name]([p])
        opts[name].step()  # state (SOAP: bases) outside the timing
    cheap = {
        "AdamW": opts["AdamW"].step,
        "SOAP plain": forced_step(opts["SOAP"], params["SOAP"], 2),
        "SOAP refresh": forced_step(opts["SOAP"], params["SOAP"], FREQUENCY),
        "Shampoo plain": forced_step(opts["Shampoo"], params["Shampoo"], 2),
    }
    if is_matrix:
        cheap["Muon"] = opts["Muon"].step
    costly = {
        "SOAP eigh (first step)": forced_step(opts["SOAP"], params["SOAP"], None),
        "Shampoo refresh": forced_step(opts["Shampoo"], params["Shampoo"], 1),
    }
    medians = round_robin(cheap, repeats) | round_robin(costly, eigh_repeats)
    ms = {name: 1e3 * wall for name, (wall, _) in medians.items()}
    for name in ("SOAP", "Shampoo"):
        ms[f"{name} amortized"] = ((FREQUENCY - 1) * ms[f"{name} plain"] + ms[f"{name} refresh"]) / FREQUENCY
    return ms


KRON_COLUMNS = ["AdamW", "SOAP plain", "SOAP refresh", "SOAP amortized", "SOAP eigh (first step)",
                "Shampoo plain", "Shampoo refresh", "Shampoo amortized", "Muon"]


def print_kronecker_table(preset: str, repeats: int, eigh_repeats: int) -> None:
    """Print the second table, a row per distinct shape of the preset (as each is timed)."""
    with torch.device("meta"):
        model = GPT(ModelConfig.from_name(preset))
    roles = model.param_roles()
    shapes = Counter((tuple(p.shape), roles[n] == "matrix") for n, p in model.named_parameters())
    header = ["shape", "count", *[f"{c} ms" for c in KRON_COLUMNS], "SOAP amortized / AdamW", "Muon / AdamW"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header), flush=True)
    totals = dict.fromkeys(KRON_COLUMNS, 0.0)
    adamw_matrices = 0.0
    torch.linalg.eigh(torch.eye(8))  # loads LAPACK outside the timing
    for (shape, is_matrix), count in shapes.items():
        ms = time_shape(shape, is_matrix, repeats, eigh_repeats)
        for c in KRON_COLUMNS:
            totals[c] += count * ms.get(c, 0.0)
        adamw_matrices += count * ms["AdamW"] if is_matrix else 0.0
        cells = [f"{ms[c]:.2f}" if c in ms else "-" for c in KRON_COLUMNS]
        muon = f"{ms['Muon'] / ms['AdamW']:.2f}x" if is_matrix else "-"
        print(f"| {'x'.join(map(str, shape))} | {count} | " + " | ".join(cells)
              + f" | {ms['SOAP amortized'] / ms['AdamW']:.2f}x | {muon} |", flush=True)
    cells = [f"{totals[c]:.1f}" for c in KRON_COLUMNS]
    print(f"| model: sum of count x ms | {sum(shapes.values())} | " + " | ".join(cells)
          + f" | {totals['SOAP amortized'] / totals['AdamW']:.2f}x"
          + f" | {totals['Muon'] / adamw_matrices:.2f}x (matrices) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset whose parameter shapes are used")
    parser.add_argument("--repeats", type=int, help="samples per optimizer (median); default 15 for tiny, 5 otherwise")
    parser.add_argument("--steps", type=int, help="steps per sample; default 5 for tiny, 1 otherwise")
    parser.add_argument("--kron-repeats", type=int, help="samples per shape in the second table; "
                        "default 15 for tiny, 2 otherwise")
    parser.add_argument("--eigh-repeats", type=int, help="samples of the eigh-bound columns (SOAP's first step, "
                        "Shampoo's refresh); default 5 for tiny, 1 otherwise")
    parser.add_argument("--skip-kron", action="store_true", help="only the first table")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.preset == "tiny"
    repeats, steps = args.repeats or (15 if tiny else 5), args.steps or (5 if tiny else 1)

    model = build_model(args.preset)
    n = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {n:,} parameters in {len(list(model.parameters()))} tensors; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{repeats} samples of {steps} step(s), median\n", flush=True)
    rows, first_steps = time_model(model, repeats, steps)
    wall0, cpu0 = rows[REFERENCE]
    print(f"| optimizer | wall ms / step | vs {REFERENCE} | CPU ms / step | vs {REFERENCE} | first 2 steps s |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for name, (wall, cpu) in rows.items():
        print(f"| {name} | {wall:.2f} | {wall / wall0:.2f}x | {cpu:.2f} | {cpu / cpu0:.2f}x "
              f"| {first_steps[name]:.1f} |")
    print(flush=True)
    if not args.skip_kron:
        del model  # frees the whole-model gradients and states before the per-shape runs
        kron_repeats, eigh_repeats = args.kron_repeats or (15 if tiny else 2), args.eigh_repeats or (5 if tiny else 1)
        print(f"One tensor per distinct shape, wall-clock ms, median of {kron_repeats} samples ({eigh_repeats} for "
              f"SOAP's eigh and Shampoo's refresh); amortized = (9 plain + 1 refresh) / {FREQUENCY}:\n")
        print_kronecker_table(args.preset, kron_repeats, eigh_repeats)


if __name__ == "__main__":
    main()
