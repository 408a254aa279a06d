"""The update-size diagnostic: each logged step size equals the difference of the weights that two
runs, one step apart, leave behind; sharded parameters give the same ratios as one process."""

import numpy as np
import pytest
import torch

from cli_helpers import fit, scalars, tiny_args
from lm_opt.callbacks.effective_lr import QUANTILES
from lm_opt.callbacks.update_size import relative_norms, squared_norms

# SGD (no state an effective lr could be read from) at a constant lr, two micro-batches a step.
SGD = ("--config", "configs/optim/sgd.yaml", "--model.warmup", "0", "--model.min_lr_ratio", "1.0",
       "--trainer.accumulate_grad_batches", "2")


def weights(run_dir) -> dict[str, np.ndarray]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v.float().numpy() for k, v in state.items() if k.startswith("model.")}


def test_logged_update_sizes_equal_the_weights_difference_of_runs_one_step_apart(tmp_path):
    fit(*tiny_args(tmp_path, "two", 2, *SGD, "--trainer.val_check_interval", "4"))
    # update_size follows eff_lr's schedule: every optimizer step here, once per step of 2 micro-batches.
    fit(*tiny_args(tmp_path, "three", 3, *SGD, "--trainer.val_check_interval", "6", "--eff_lr.every_n_steps", "1"))
    before, after, run = weights(tmp_path / "two"), weights(tmp_path / "three"), tmp_path / "three"
    ratios = []
    for name in before:
        logged = scalars(run, f"update/{name}/rel_norm")
        if not logged:
            assert name == "lm_head.weight", name  # tied to wte.weight: one parameter, logged once
            continue
        assert list(logged) == [0, 1, 2], name
        delta = after[name] - before[name]
        ratios.append(np.linalg.norm(delta) / np.linalg.norm(before[name]))
        assert logged[2] == pytest.approx(ratios[-1], rel=1e-5), name
        expected = np.quantile(np.abs(delta), QUANTILES, method="nearest")
        for q, value in zip(QUANTILES, expected):
            assert scalars(run, f"update/{name}/q{round(q * 100)}")[2] == pytest.approx(value, rel=1e-6), (name, q)
    assert len(ratios) > 10
    expected = np.quantile(ratios, QUANTILES, method="nearest")
    for q, value in zip(QUANTILES, expected):
        assert scalars(run, f"update_rel_norm/q{round(q * 100)}")[2] == pytest.approx(value, rel=1e-5), q


def test_relative_norms_of_tensors_including_an_all_zero_one():
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(5, 4, generator=gen), torch.zeros(3), torch.randn(7, generator=gen, dtype=torch.bfloat16)]
    after = [b + 0.01 * torch.randn(b.shape, generator=gen).to(b.dtype) for b in before]
    norms = squared_norms(before, after, [False] * 3)
    assert norms.dtype == torch.float32
    expected = [np.linalg.norm((a.double() - b.double()).numpy()) / np.linalg.norm(b.double().numpy())
                if b.any() else np.inf for b, a in zip(before, after)]
    np.testing.assert_allclose(relative_norms(norms).numpy(), expected, rtol=1e-5)


def test_no_copies_and_no_tags_when_turned_off(tmp_path):
    fit(*tiny_args(tmp_path, "off", 2, "--eff_lr.every_n_steps", "1", "--update_size.every_n_steps", "0"))
    assert scalars(tmp_path / "off", "eff_lr/blocks.0.mlp.fc.weight/q50")
    assert not scalars(tmp_path / "off", "update_rel_norm/q50")


@pytest.mark.slow
def test_sharded_parameters_give_the_ratios_of_one_process(tmp_path):
    """FSDP2 on 2 CPU processes: each rank's shard, norms summed in one all-reduce, equal one
    process accumulating the same batches; no per-entry quantiles of sharded tensors. About 30 s."""
    from test_distributed import FSDP2, run

    every = ("--update_size.every_n_steps", "1", "--eff_lr.every_n_steps", "0")
    run(*tiny_args(tmp_path, "fsdp", 2, *FSDP2, *every))
    fit(*tiny_args(tmp_path, "single", 2, *every, "--data.num_workers", "2", "--trainer.accumulate_grad_batches", "2",
                   "--trainer.val_check_interval", "4", "--trainer.precision", "32-true"))
    name = "blocks.0.mlp.fc.weight"
    single = scalars(tmp_path / "single", f"update/{name}/rel_norm")
    assert list(single) == [0, 1]
    assert scalars(tmp_path / "fsdp", f"update/{name}/rel_norm") == pytest.approx(single, rel=1e-4)
    assert scalars(tmp_path / "fsdp", "update_rel_norm/q50") == pytest.approx(
        scalars(tmp_path / "single", "update_rel_norm/q50"), rel=1e-4)
    assert not scalars(tmp_path / "fsdp", f"update/{name}/q50") and scalars(tmp_path / "single", f"update/{name}/q50")
