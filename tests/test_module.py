"""What the LightningModule logs, and how it prepares the model."""

import json
import subprocess
import sys

import pytest
import torch

from cli_helpers import fit, scalars, summary, tiny_args
from lm_opt.module import LMModule


def test_tokens_seen_are_logged_at_the_logging_steps_beside_the_loss(tmp_path):
    fit(*tiny_args(tmp_path, "run", 4, "--trainer.log_every_n_steps", "2", "--trainer.accumulate_grad_batches", "2"))
    tokens_per_step = summary(tmp_path / "run")["tokens"] // 4
    assert tokens_per_step == 2 * 4 * 32
    loss_steps = set(scalars(tmp_path / "run", "train/loss"))
    assert scalars(tmp_path / "run", "train/tokens") == {1: 2 * tokens_per_step, 3: 4 * tokens_per_step}
    assert loss_steps == {1, 3}


def test_fused_adamw_trains_under_bf16_mixed_with_gradient_clipping(tmp_path):
    """Lightning refuses to clip for a fused optimizer under mixed precision (fp16's scaler);
    the study configs run fused AdamW under bf16-mixed with clipping at 1."""
    fit(*tiny_args(tmp_path, "run", 2, "--config", "configs/optim/adamw.yaml", "--trainer.precision", "bf16-mixed",
                   "--trainer.gradient_clip_val", "1.0"))
    assert summary(tmp_path / "run")["status"] == "finished"


@pytest.mark.slow
def test_the_compiled_model_and_loss_give_the_eager_loss_and_gradients():
    """`compile: true` traces model and loss as one graph: the same numbers, fewer passes. In
    float32 on every kind; the compiled kernels fuse and sum in another order: measured, the losses
    equal and the gradients within 7% of rtol=1e-4 on the Xeon, 6% and 5% as the EPYC kinds
    (`.ci/as-kind`, torch.compile's AVX2 kernels on the second)."""
    torch.manual_seed(0)
    eager = LMModule(preset="tiny")
    compiled = LMModule(preset="tiny", compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    compiled.configure_model()
    batch = {"input_ids": torch.randint(0, 8100, (2, 33), generator=torch.Generator().manual_seed(1))}
    results = []
    for module in (eager, compiled):
        ce, z = module._losses(batch)
        (ce + z).backward()
        results.append((ce.detach(), z.detach(), {n: p.grad for n, p in module.model.named_parameters()}))
    (ce0, z0, g0), (ce1, z1, g1) = results
    torch.testing.assert_close(ce1, ce0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-9)
    assert g0.keys() == g1.keys()  # names unchanged: routes and roles hold
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


FAULTS_PER_STEP = """
import json, resource
import torch
from lm_opt.memory import keep_freed_memory
from lm_opt.model import lm_loss

logits = torch.randn(16, 128, 8192, requires_grad=True)
targets = torch.randint(0, 8100, (16, 128))
faults = {"default": [], "kept": []}
for setting in faults:
    if setting == "kept":
        keep_freed_memory()
    for _ in range(6):  # the heap grows in the first few
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ce, z = lm_loss(logits, targets, 1e-4)
        (ce + z).backward()
        faults[setting].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_the_loss_over_cpu_sized_logits_reuses_freed_memory_without_page_faults():
    """Each CPU step frees and allocates the (tokens, vocabulary) logits' float32 copies: 64 MB, 16k
    pages. Measured in a fresh process, as a run starts: malloc's arenas here hold the tests' history."""
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, check=True).stdout
    faults = json.loads(out)
    assert min(faults["default"][-3:]) > 16_000, faults  # each step maps its 64 MB blocks afresh
    assert min(faults["kept"][-3:]) < 1000, faults
