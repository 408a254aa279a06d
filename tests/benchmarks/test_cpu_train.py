"""benchmarks.cpu_train runs on the landed code at its smallest size (a smoke run: its figures are
measured by hand for the README), and its profile accounts for every category."""

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cpu_train import CATEGORIES

ROOT = Path(__file__).parents[2]
SMOKE = ["--preset", "tiny", "--batch_size", "2", "--seq_len", "16", "--steps", "2", "--warmup", "1", "--rounds", "1",
         "--matmul_seconds", "0.05", "--profile_steps", "1", "--settings", "32-true", "bf16-mixed"]


@pytest.mark.slow
def test_the_cpu_training_benchmark_runs_and_prints_every_row():
    result = subprocess.run([sys.executable, "-m", "benchmarks.cpu_train", *SMOKE], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "matmul rate at the model's shapes: float32" in out
    for row in ("| 32-true |", "| bf16-mixed |", *(f"| {c} |" for c in CATEGORIES), "| step |"):
        assert row in out, row
