"""Two CPU processes (gloo) under DDP and under FSDP2 against one process on the same data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import fit, scalars, summary, tiny_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def run(*args: str) -> str:
    """`python -m lm_opt ...` in a subprocess (Lightning's DDP launcher re-runs the command per
    rank); what it printed. Runs on one process go through `fit`, in this process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "-m", "lm_opt", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def ddp(devices: int = 2) -> tuple[str, ...]:
    return ("--trainer.strategy", "ddp", "--trainer.devices", str(devices))


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def test_ddp_routed_training_matches_one_process_accumulating_the_same_batches(tmp_path):
    """Rank r of 2 reads part r of the stream; one process with 2 DataLoader workers reads the
    same two parts in turn, so accumulating 2 micro-batches sees the batches of both ranks.

    The gradients are the same sums (see `train_routed`): on each CPU kind (`.ci/as-kind`; bf16
    on the AVX-512 kinds, float32 on AVX2) the weights came out equal to the bit and the
    validation losses within 1.1e-7, the ranks' halves of the mean being added in another float32
    order. rel=1e-5 and rtol=1e-4 leave that order room on any kind."""
    routed = ("--config", "configs/optim/sgd_adalayer_last_norm.yaml")
    run(*tiny_args(tmp_path, "ddp", 4, *routed, *ddp()))
    fit(*tiny_args(tmp_path, "single", 4, *routed, "--data.num_workers", "2",
                   "--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "8"))
    ddp_run, single = summary(tmp_path / "ddp"), summary(tmp_path / "single")
    assert ddp_run["status"] == single["status"] == "finished"
    assert ddp_run["tokens"] == single["tokens"] == 4 * 2 * 4 * 32
    assert ddp_run["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# configs/fsdp.yaml itself, on 2 CPU processes, with the tiny runs' batch and validation interval.
# In float32, so that the comparison with one process is one of summation order alone.
FSDP2 = ("--config", "configs/fsdp.yaml", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--data.batch_size", "4", "--trainer.val_check_interval", "4", "--trainer.precision", "32-true")


def test_fsdp2_training_matches_one_process(tmp_path):
    """The DDP comparison above, sharded (configs/fsdp.yaml's AdamW), with the diagnostics on: the
    update size every step (each rank's shard, norms summed in one all-reduce, gives one process's
    ratios; no per-entry quantiles of sharded tensors) and the effective lr every 2 steps (the
    shards gathered to rank 0, every rank taking part: one process's quantiles). Its resume is
    tested with every sharding scheme in tests/test_preemption.py.

    Float32 on every kind, so only the summation order differs; measured on the three kinds
    (`.ci/as-kind`): the weights use up to 44% of rtol=1e-4, the update sizes differ by 1.1e-6, the
    effective lrs by 4.3e-5 (eps 1e-8 against small second moments magnifies the order), the
    validation losses not at all. rel=1e-4 holds them on any kind."""
    every = ("--update_size.every_n_steps", "1", "--eff_lr.every_n_steps", "2")
    printed = run(*tiny_args(tmp_path, "fsdp", 4, *FSDP2, *every))
    assert "route 'all': AdamW on parameter shards: elementwise" in printed
    fit(*tiny_args(tmp_path, "single", 4, *every, "--data.num_workers", "2", "--trainer.accumulate_grad_batches", "2",
                   "--trainer.val_check_interval", "8", "--trainer.precision", "32-true"))
    fsdp, single = summary(tmp_path / "fsdp"), summary(tmp_path / "single")
    assert fsdp["status"] == single["status"] == "finished"
    assert fsdp["tokens"] == single["tokens"] == 4 * 2 * 4 * 32
    assert fsdp["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "single")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    name = "blocks.0.mlp.fc.weight"
    ratios = scalars(tmp_path / "single", f"update/{name}/rel_norm")
    assert list(ratios) == [0, 1, 2, 3]
    assert scalars(tmp_path / "fsdp", f"update/{name}/rel_norm") == pytest.approx(ratios, rel=1e-4)
    assert scalars(tmp_path / "fsdp", "update_rel_norm/q50") == pytest.approx(
        scalars(tmp_path / "single", "update_rel_norm/q50"), rel=1e-4)
    assert not scalars(tmp_path / "fsdp", f"update/{name}/q50") and scalars(tmp_path / "single", f"update/{name}/q50")
    for q in ("q5", "q50", "q95"):
        eff_lr = scalars(tmp_path / "single", f"eff_lr/{name}/{q}")
        assert list(eff_lr) == [1, 3]
        assert scalars(tmp_path / "fsdp", f"eff_lr/{name}/{q}") == pytest.approx(eff_lr, rel=1e-4)


# One route per sharding scheme, joined in one CompositeOptimizer: the owner scheme (Muon on the
# hidden matrices), row/column statistics all-reduced (Adalayer on the last layer, Adafactor* on
# the embedding), elementwise (AdamW on the norms).
EVERY_SCHEME = """\
trainer:
  callbacks:
    - class_path: lm_opt.callbacks.OptimizerCallback
      init_args:
        optimizer: null
        routes:
          - roles: [matrix]
            optimizer: {class_path: lm_opt.optim.Muon, init_args: {lr: 0.02, weight_decay: 0.1}}
          - roles: [last_layer]
            optimizer: {class_path: lm_opt.optim.Adalayer, init_args: {lr: 3.16e-3}}
          - roles: [norm]
            optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.16e-3}}
          - name: rest
            optimizer: {class_path: lm_opt.optim.Adafactor, init_args: {lr: 3.16e-3}}
"""


def test_torch_muon_under_fsdp2_is_refused_before_training_naming_lm_opt_muon(tmp_path):
    """torch.optim.Muon updates whole tensors in place: one error line, before the second rank starts."""
    config = tmp_path / "torch_muon.yaml"
    config.write_text((ROOT / "configs" / "optim" / "muon.yaml").read_text().replace("lm_opt.optim.Muon",
                                                                                     "torch.optim.Muon"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run([sys.executable, "-m", "lm_opt", *tiny_args(tmp_path, "muon", 4, *FSDP2, "--config",
                                                                        str(config))],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "route 'matrix': Muon cannot run under FSDP2Strategy" in errors[0] and "lm_opt.optim.Muon" in errors[0]
    assert not (tmp_path / "muon" / "checkpoints").exists()


def test_another_packages_soap_under_fsdp2_is_refused_before_training_naming_the_way_out(tmp_path):
    """pytorch_optimizer.SOAP preconditions whole matrices: on shards it would silently compute another update."""
    config = tmp_path / "their_soap.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lm_opt.callbacks.OptimizerCallback\n      init_args:\n"
                      "        routes: null\n        optimizer: {class_path: pytorch_optimizer.SOAP, init_args: {lr: 3.0e-3}}\n")
    result = subprocess.run([sys.executable, "-m", "lm_opt", *tiny_args(tmp_path, "soap", 4, *FSDP2, "--config",
                                                                        str(config))],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "route 'all': SOAP cannot run under FSDP2Strategy" in errors[0] and "elementwise: true" in errors[0]
    assert not (tmp_path / "soap" / "checkpoints").exists()


def test_validation_loss_is_the_same_on_one_and_two_processes(tmp_path):
    """The same weights through the same kernels; two ranks hold 4 and 3 sequences and their
    token-weighted sums meet in another float32 order than one process's: 1.0e-7 apart on the
    Xeon and as epyc-avx2, equal as epyc-avx512-bf16 (`.ci/as-kind`). rel=1e-6 on any kind."""
    fit(*tiny_args(tmp_path, "train", 2))
    ckpt = str(tmp_path / "train" / "checkpoints" / "last.ckpt")
    validate = ["validate" if a == "fit" else a for a in tiny_args(tmp_path, "v1", 2)]
    fit(*validate, "--ckpt_path", ckpt)
    validate2 = ["validate" if a == "fit" else a for a in tiny_args(tmp_path, "v2", 2)]
    run(*validate2, *ddp(), "--ckpt_path", ckpt, "--data.val_sequences", "7")  # ranks hold 4 and 3
    fit(*validate, "--ckpt_path", ckpt, "--data.val_sequences", "7", "--trainer.logger.init_args.name", "v7")
    one, two = scalars(tmp_path / "v7", "val/loss"), scalars(tmp_path / "v2", "val/loss")
    assert list(one.values()) == pytest.approx(list(two.values()), rel=1e-6)
    assert scalars(tmp_path / "v1", "val/loss")


OPTIM_CONFIGS = sorted((ROOT / "configs" / "optim").glob("*.yaml"))
# The comparisons' vocabulary: small enough that SOAP's and Shampoo's factors of the embedding and
# the output layer stay small (the tiny preset's 8192 took minutes per config), and large enough
# that most rows get no gradient in a step, as in a real language model.
VOCAB = 256


def comparison_model():
    from lm_opt.model import GPT, ModelConfig

    return GPT(ModelConfig.from_name("tiny", n_layer=1, vocab_size=VOCAB))


def train_routed(config: Path, rank: int = 0, world_size: int = 1, steps: int = 3,
                 sharded: bool = False, clip: bool = True) -> dict[str, torch.Tensor]:
    """A few steps of the tiny model with the config's optimizer on a global batch of two halves.

    Under DDP rank r computes the gradient of half r and DDP averages them: g0/2 + g1/2. Alone,
    the process accumulates the two halves with their losses halved: the same sums, in the same
    order, so the results must agree to the bit, whatever the optimizer does with them. Under
    FSDP2 (`sharded`) each rank updates its dim-0 shard of every parameter and returns the
    gathered full tensors. `clip` clips the gradients' global norm to 1.
    """
    import yaml
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from lm_opt.callbacks.optimizer import OptimizerCallback
    from lm_opt.model import lm_loss
    from lm_opt.parallel import shard

    torch.set_num_threads(1)  # the same kernels, so the same rounding, in every process
    init_args = yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"]
    torch.manual_seed(0)
    model = comparison_model()
    if sharded:
        forward = shard(model, init_device_mesh("cpu", (world_size,)))
    else:
        forward = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = OptimizerCallback(**init_args).build(model)
    halves = [rank] if world_size > 1 else [0, 1]
    for step in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        for half in halves:
            part = tokens[2 * half:2 * half + 2]
            ce, z = lm_loss(forward(part[:, :-1]), part[:, 1:], model.config.z_loss)
            ((ce + z) / len(halves)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    full = (p.full_tensor() if sharded else p for p in model.parameters())
    return {n: p.detach().clone() for (n, _), p in zip(model.named_parameters(), full)}


def test_every_optimizer_gives_the_same_result_under_ddp_as_on_one_process(distributed):
    """Bit for bit on any CPU kind: every process computes on one thread with the same kernels on
    the same shapes (`train_routed`), so equal sums round alike, bf16 Newton-Schulz included."""
    for config in OPTIM_CONFIGS:
        single = train_routed(config)
        under_ddp = torch.load(distributed / f"ddp_{config.stem}.pt")
        fused = "fused: true" in config.read_text()
        for name, value in single.items():
            if fused:  # torch's fused CPU AdamW kernel is not bitwise reproducible across processes
                torch.testing.assert_close(under_ddp[name], value, rtol=1e-6, atol=1e-8,
                                           msg=lambda m: f"{config.stem}: {name} differs under DDP: {m}")
            else:
                assert torch.equal(under_ddp[name], value), f"{config.stem}: {name} differs under DDP"


def shardable(config: Path) -> bool:
    """Whether every optimizer of a config updates FSDP2 shards (all but torch.optim.Muon)."""
    import yaml

    from lm_opt.callbacks.optimizer import OptimizerCallback
    from lm_opt.optim.routing import sharding_obstacle

    callback = OptimizerCallback(**yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"])
    return not any(sharding_obstacle(cls) for cls in callback.classes)


SHARDABLE_CONFIGS = [c for c in OPTIM_CONFIGS if shardable(c)]


def comparison_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Both comparisons' distributed halves in one launch of 2 processes: every config under DDP,
    then every shardable one under FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh

    from lm_opt.model import GPT, ModelConfig
    from lm_opt.parallel import shard

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for config in OPTIM_CONFIGS:
        params = train_routed(config, rank, world_size=2)
        if rank == 0:
            torch.save(params, Path(out_dir) / f"ddp_{config.stem}.pt")
    model = GPT(ModelConfig.from_name("tiny"))
    unsharded = model.flops_per_token(128)
    shard(model, init_device_mesh("cpu", (2,)))
    # MFU counts the whole model's FLOPs on every rank, not those of the local shards.
    assert model.flops_per_token(128) == unsharded
    for config in SHARDABLE_CONFIGS:
        params = train_routed(config, rank, world_size=2, sharded=True, clip=False)
        if rank == 0:
            torch.save(params, Path(out_dir) / f"fsdp_{config.stem}.pt")
    torch.distributed.barrier()  # no rank tears down its gloo pairs while a peer still sends on them
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> Path:
    """The folder of the 2-process results, `ddp_<config>.pt` and `fsdp_<config>.pt`."""
    out = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(comparison_worker, args=(str(out / "init"), str(out)), nprocs=2)
    return out


def exchanges_statistics(config: Path) -> bool:
    """Whether a route's optimizer all-reduces statistics summed from each rank's rows."""
    import yaml

    from lm_opt.callbacks.optimizer import OptimizerCallback
    from lm_opt.optim.owner import OwnerOptimizer

    callback = OptimizerCallback(**yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"])
    return any(getattr(cls, "sharding_scheme", None) and not issubclass(cls, OwnerOptimizer)
               for cls in callback.classes)


def test_every_shardable_optimizer_gives_the_same_result_under_fsdp2_as_on_one_process(distributed):
    """Sharded updates of the same averaged gradients, 3 steps, without clipping.

    On 2 ranks FSDP2's averaged gradient is one process's to the bit, so elementwise optimizers
    and Muon, SOAP and Shampoo (whose owner gathers the whole gradient) must give identical
    parameters. Optimizers
    that all-reduce statistics summed from each rank's rows add in another order than one
    process: they may differ by float32 rounding, at most 1e-5 of how far a tensor moved
    (measured: below 8e-6). Clipping is left out because the global norm of sharded gradients
    is summed in another order too: one last bit of the clip factor turns Muon's bfloat16
    Newton-Schulz iterate to another rounding, up to 15% of a step apart after one step
    (measured); clipping under FSDP2 is covered by the command-line test above.
    """
    assert {c.stem for c in SHARDABLE_CONFIGS} >= {"adamw", "lion", "signum", "sgd", "schedule_free", "adafactor",
                                                    "adalayer", "adam_mini", "sgd_adalayer_last_norm", "muon",
                                                    "soap", "shampoo"}
    torch.manual_seed(0)
    initial = dict(comparison_model().named_parameters())
    for config in SHARDABLE_CONFIGS:
        single = train_routed(config, clip=False)
        sharded = torch.load(distributed / f"fsdp_{config.stem}.pt")
        for name, value in single.items():
            if exchanges_statistics(config):
                moved = (value - initial[name]).abs().max().item()
                torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5 * moved,
                                           msg=lambda m: f"{config.stem}: {name} differs under FSDP2: {m}")
            else:
                assert torch.equal(sharded[name], value), f"{config.stem}: {name} differs under FSDP2"
