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
    """Run `three` logs step 3's update; run `two` stops where step 3 starts. Both runs compute their
    first two steps with the same kernels on one thread, so `three`'s weights before step 3 are
    `two`'s last ones bit for bit on any CPU kind, bf16 or not: what is compared is the callback's
    arithmetic, never two runs' bf16 rounding.

    The reference norms are taken in float64. A float32 `np.linalg.norm` is OpenBLAS's float32 dot,
    whose error on the 1M squares of `lm_head.weight`'s step depends on the kernel OpenBLAS picks
    for the CPU: 0.9e-5 to 1.6e-5 low with its AVX-512 kernel over seeds 0 to 4, 3.2e-5 to 4.9e-5
    with its AVX2 one (`OPENBLAS_CORETYPE=Haswell`, an EPYC without AVX-512), against the 1e-5 this
    test allowed. The callback's float32 norms come from torch's cascade sum, 7e-8 off the float64
    sum of squares with ATen's AVX-512, AVX2 and scalar kernels alike; with the square root, the
    division and TensorBoard's float32, a logged ratio is within 3e-7 of the exact one: rel=1e-6 on
    every kind. The quantiles of |delta| pick entries of the same float32 differences: exact."""
    fit(*tiny_args(tmp_path, "two", 2, *SGD, "--trainer.val_check_interval", "4"))
    # update_size follows eff_lr's schedule: every optimizer step here, once per step of 2 micro-batches.
    fit(*tiny_args(tmp_path, "three", 3, *SGD, "--trainer.val_check_interval", "6", "--eff_lr.every_n_steps", "1"))
    before, after, run = weights(tmp_path / "two"), weights(tmp_path / "three"), tmp_path / "three"
    ratios = []
    for name in before:
        logged = scalars(run, f"update/{name}/rel_norm")
        assert list(logged) == [0, 1, 2], name
        delta = after[name] - before[name]  # the float32 difference the callback takes
        ratios.append(np.linalg.norm(delta.astype(np.float64)) / np.linalg.norm(before[name].astype(np.float64)))
        assert logged[2] == pytest.approx(ratios[-1], rel=1e-6), name
        expected = np.quantile(np.abs(delta), QUANTILES, method="nearest")
        for q, value in zip(QUANTILES, expected):
            assert scalars(run, f"update/{name}/q{round(q * 100)}")[2] == pytest.approx(value, rel=1e-6), (name, q)
    assert len(ratios) > 10
    expected = np.quantile(ratios, QUANTILES, method="nearest")
    for q, value in zip(QUANTILES, expected):
        assert scalars(run, f"update_rel_norm/q{round(q * 100)}")[2] == pytest.approx(value, rel=1e-6), q


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
