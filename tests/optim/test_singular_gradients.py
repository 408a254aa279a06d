"""Zero and rank-deficient gradients: no optimizer turns them into NaN (issue 22).

A language model's embedding and output layer get a rank-deficient gradient whenever the
vocabulary is larger than the batch (the rows of absent tokens are zero), and a parameter
unused in a step gets a zero one. SOAP's and Shampoo's statistics are then singular.
"""

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from lm_opt.model import GPT, ModelConfig, lm_loss
from lm_opt.optim import (
    EMASGD,
    SOAP,
    Adafactor,
    Adalayer,
    AdamMini,
    CompositeOptimizer,
    Lion,
    Muon,
    ScheduleFreeAdamW,
    Shampoo,
    Signum,
)
from lm_opt.optim.kronecker import eigh_with_fallback

SHAPES = [(64, 16), (16, 32), (16,)]  # an embedding, a matrix, a norm gain
STEPS = 6
# Seeds whose first gradients' statistics MKL's float32 eigh (torch 2.13's CPU LAPACK) turns into
# NaN vectors: seed 0 in float32, seed 9 in bf16 (other seeds make it raise, or succeed).
SEEDS = (0, 9)
KINDS = ("zero_rows", "zero", "rank_one")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def matrices_to_muon(params, **kwargs) -> CompositeOptimizer:
    """Muon on the matrices, AdamW on the rest, as configs/optim/muon.yaml routes them."""
    params = list(params)
    return CompositeOptimizer([Muon([p for p in params if p.dim() == 2], lr=0.02, **kwargs),
                               torch.optim.AdamW([p for p in params if p.dim() != 2], lr=3e-3)])


# Every optimizer of lm_opt.optim (and the AdamW it is compared with) at the study's eps where it
# has one; SOAP and Shampoo refresh every 2 steps, so that a singular statistic is decomposed
# again mid-run.
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-15, weight_decay=0.1),
    "adafactor": lambda ps: Adafactor(ps, lr=1e-2, eps=1e-15),
    "adalayer": lambda ps: Adalayer(ps, lr=1e-2, eps=1e-15),
    "frozen_adalayer": lambda ps: Adalayer(ps, lr=1e-2, eps=1e-15, freeze_after=2),
    "adam_mini": lambda ps: AdamMini(ps, lr=1e-2, eps=1e-15),
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
    "signum": lambda ps: Signum(ps, lr=1e-3),
    "ema_sgd": lambda ps: EMASGD(ps, lr=0.1),
    "schedule_free": lambda ps: ScheduleFreeAdamW(ps, lr=1e-2, eps=1e-15, warmup_steps=2),
    "soap": lambda ps: SOAP(ps, lr=1e-2, precondition_frequency=2),
    "shampoo": lambda ps: Shampoo(ps, lr=1e-2, precondition_frequency=2),
    "shampoo2": lambda ps: Shampoo(ps, lr=1e-2, precondition_frequency=2, exponent=-0.5),
    "muon": matrices_to_muon,
}


@pytest.fixture(autouse=True)
def one_thread():
    """MKL's eigh of a singular statistic picks the basis of its null space by the thread count, and
    Adam in that basis is not invariant to its rotation: every run here uses one thread, as the
    FSDP2 workers do (two threads on two busy cores are also many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def singular_grad(kind: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A gradient of ``kind``: an embedding's, whose rows of ids absent from a batch of
    ``shape[0] // 4`` are zero; all zero; or rank one."""
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "rank_one":
        rows, cols = torch.randn(shape[0], generator=gen), torch.randn(math.prod(shape[1:]), generator=gen)
        return torch.outer(rows, cols).view(shape)
    n = shape[0] // 4
    ids = torch.randint(0, shape[0], (n,), generator=gen)
    return torch.zeros(shape).index_add_(0, ids, torch.randn(n, *shape[1:], generator=gen))


def run_singular(name: str, kind: str, dtype: torch.dtype, seed: int,
                 distribute=lambda t: t) -> list[torch.Tensor]:
    """``STEPS`` steps of ``kind`` gradients on parameters of ``SHAPES`` in ``dtype``; their values.

    ``distribute`` places each full parameter and gradient (a ``DTensor`` shard on FSDP2 ranks).
    """
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(distribute(torch.randn(s, generator=gen).to(dtype))) for s in SHAPES]
    optimizer = OPTIMIZERS[name](params)
    for _ in range(STEPS):
        for p in params:
            p.grad = distribute(singular_grad(kind, tuple(p.shape), gen).to(dtype))
        optimizer.step()
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in params]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameters_stay_finite(name, kind, dtype):
    for seed in SEEDS:
        for p in run_singular(name, kind, dtype, seed):
            assert p.isfinite().all(), f"{name}: a {tuple(p.shape)} parameter is not finite (seed {seed})"


def embedding_statistic(seed: int) -> torch.Tensor:
    """``G G^T`` of a 256 x 64 embedding gradient over 60 token ids: rows of absent ids are zero."""
    grad = singular_grad("zero_rows", (256, 64), torch.Generator().manual_seed(seed))
    return grad @ grad.T


@pytest.mark.parametrize("seed", [17, 35])  # float32 eigh returns NaN vectors for these
def test_eigh_of_embedding_statistic_is_finite_and_exact(seed):
    mat = embedding_statistic(seed)
    vals, vecs = eigh_with_fallback(mat)
    assert vals.dtype == vecs.dtype == torch.float32
    assert vecs.isfinite().all() and vals.isfinite().all()
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(256), atol=1e-5, rtol=0)
    atol = 1e-4 * mat.abs().max().item()
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, mat, atol=atol, rtol=0)


def test_eigh_redoes_nonfinite_float32_result_in_float64():
    """Whatever the LAPACK: a float32 decomposition with NaN vectors is redone in float64."""
    real = torch.linalg.eigh

    def nan_below_float64(mat):
        vals, vecs = real(mat)
        return (vals, vecs) if mat.dtype == torch.float64 else (vals, torch.full_like(vecs, math.nan))

    with mock.patch("torch.linalg.eigh", nan_below_float64):
        vals, vecs = eigh_with_fallback(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    assert vals.dtype == vecs.dtype == torch.float32
    torch.testing.assert_close(vals, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(vecs.abs(), torch.full((2, 2), 0.5**0.5))


def test_eigh_of_zero_statistic_is_the_identity_basis():
    vals, vecs = eigh_with_fallback(torch.zeros(16, 16))
    assert torch.equal(vecs.abs(), torch.eye(16)) and vals.abs().max() <= 1e-29


def gpt_losses(make_optimizer, steps: int, dtype=torch.float32, repeat: bool = False, seed: int = 21,
               mesh=None):
    """Issue 22's case: a 2-block GPT (vocabulary 250 padded to 256, width 64, 4 heads) and 4 x 16
    random tokens a step (the same batch every step if ``repeat``). About 200 of the 256 embedding
    rows get no gradient in a step. On a ``mesh`` the model is FSDP2-sharded and rank r takes
    sequences r::world. Returns the loss of each step and the model."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=250)).to(dtype)
    rows = slice(None)
    if mesh is not None:
        from lm_opt.parallel import shard

        model, rows = shard(model, mesh), slice(mesh.get_local_rank(), None, mesh.size())
    gen = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        if not (repeat and losses):
            tokens = torch.randint(0, 250, (4, 16), generator=gen)[rows]
        ce, z = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.config.z_loss)
        optimizer.zero_grad()
        (ce + z).backward()
        optimizer.step()
        losses.append((ce + z).item())
    return losses, model


# The official SOAP (nikhilvyas/SOAP, soap.py at commit a1e5535, its defaults and lr 3e-3) on
# gpt_losses' model and batches, in float32 on one CPU thread (torch 2.13, MKL 2024.2), over 12
# steps: its basis refresh after step 11 included. The seed is one of those that made lm_opt's
# SOAP NaN from step 3 and Shampoo from step 2, as issue 22 measured (its seed was not recorded).
OFFICIAL_SOAP_LOSSES = [6.02917, 6.12583, 5.82331, 5.89848, 5.96378, 5.82123,
                        6.03545, 5.81895, 5.95300, 6.17768, 5.88184, 5.90158]


def test_soap_follows_official_soap_with_absent_embedding_rows():
    """Where the official losses were recorded, lm_opt's agree to 1e-5; the two SOAPs run side by
    side on one CPU agree to 1e-6 whatever MKL's code path and threads. The recorded losses are one
    LAPACK's, though: from step 3 Adam runs in the eigenbasis of singular statistics, and the basis
    of their null space (the absent rows) is whatever basis the LAPACK returns (see
    :func:`one_thread`). Other paths move these losses by up to 0.030 (Xeon with AMX: 0.018 on 1
    thread, 0.024 on 2; MKL held to AVX2, as `.ci/as-kind` holds it for an EPYC: 0.029, 0.030; AVX
    and SSE4.2: 0.027). abs=0.04 admits every kind's basis; lr 2e-3 or 4.5e-3 in place of 3e-3
    moves them by 0.05."""
    losses, model = gpt_losses(lambda ps: SOAP(ps, lr=3e-3), len(OFFICIAL_SOAP_LOSSES))
    assert all(p.isfinite().all() for p in model.parameters())
    assert losses == pytest.approx(OFFICIAL_SOAP_LOSSES, abs=0.04)
    assert losses[:2] == pytest.approx(OFFICIAL_SOAP_LOSSES[:2], abs=1e-5)  # before any update


TRAINED = {
    "soap": lambda ps: SOAP(ps, lr=3e-3),
    "shampoo": lambda ps: Shampoo(ps, lr=3e-3),
    "shampoo2": lambda ps: Shampoo(ps, lr=3e-3, exponent=-0.5),
    "muon": lambda ps: matrices_to_muon(ps, weight_decay=0.0),
}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("name", TRAINED)
def test_trains_on_a_batch_that_leaves_embedding_rows_absent(name, dtype):
    """One batch, again and again: its absent rows keep every statistic singular."""
    losses, model = gpt_losses(TRAINED[name], 8, dtype, repeat=True)
    assert all(p.isfinite().all() for p in model.parameters())
    assert losses[-1] < losses[0] - 0.2, losses


def sharded_worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {key: run_singular(*key, distribute=lambda t: distribute_tensor(t, mesh, [Shard(0)]))
               for key in SHARDED_RUNS}
    for name, dtype in SHARDED_GPT_RUNS:
        _, model = gpt_losses(TRAINED[name], 6, dtype, mesh=mesh)
        results[name, dtype] = [p.full_tensor() for p in model.parameters()]
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.barrier()  # no rank tears down its gloo pairs while a peer still sends on them
    dist.destroy_process_group()


SHARDED_RUNS = [(name, kind, dtype, seed) for name in ("soap", "shampoo", "muon") for kind in KINDS
                for dtype, seed in zip(DTYPES.values(), SEEDS)]
SHARDED_GPT_RUNS = [(name, dtype) for name in ("soap", "shampoo") for dtype in DTYPES.values()]


@pytest.mark.slow
def test_sharded_runs_stay_finite_and_match_one_process(tmp_path):
    """On 2 gloo ranks (FSDP2 ``Shard(0)``), each tensor's update is its owner's, computed from the
    whole gradient as on one process: the same parameters, finite. Issue 22's GPT, sharded, ends
    finite too (compared with nothing: the ranks' averaged gradients differ from one process's
    in the last bits, which turn a singular factor's null-space basis, see :func:`one_thread`)."""
    torch.multiprocessing.spawn(sharded_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = torch.load(tmp_path / "results.pt")
    for key in SHARDED_RUNS:
        for sharded, single in zip(results[key], run_singular(*key)):
            assert sharded.isfinite().all(), key
            torch.testing.assert_close(sharded, single, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")
    for key in SHARDED_GPT_RUNS:
        assert all(p.isfinite().all() for p in results[key]), key
