"""The CPU benchmarks still run on the landed code, at their smallest size (a smoke run: the
figures are measured by hand for the README). data_throughput would first build a
32000-piece tokenizer; test_data.py covers its pipeline."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

SMOKE = {
    "loop_overhead": ["--steps", "3", "--skip", "1", "--rounds", "1", "--batch_size", "2", "--seq_len", "16"],
    "eff_lr_overhead": ["--steps", "8", "--every", "6", "--batch_size", "2", "--seq_len", "16"],
    "update_size_overhead": ["--steps", "8", "--every", "6", "--batch_size", "2", "--seq_len", "16"],
    "optim_memory": ["--presets", "tiny"],
    "batched_refresh": ["--dim", "16", "--count", "2", "--rounds", "1"],
    "gpu_memory": ["--device", "cpu", "--smoke"],
    "train_step": ["--preset", "tiny", "--batch_size", "2", "--seq_len", "16", "--steps", "2", "--warmup", "1",
                   "--rounds", "1", "--max_precond_dim", "64", "--configs", "configs/optim/adamw.yaml",
                   "configs/optim/soap.yaml", "configs/optim/muon.yaml"],
    "study_run": ["--steps", "2", "--rounds", "1", "--runs", "32-true", "--preset", "tiny"],
    "sharded_step": ["--preset", "tiny", "--steps", "1", "--optimizers", "AdamW", "Adafactor", "Muon"],
}


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", sorted(SMOKE))
def test_the_benchmark_runs(benchmark):
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{benchmark}", *SMOKE[benchmark]], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
