"""benchmarks/gpu_throughput.py: a smoke run on the CPU here, the real thing where there is a GPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def throughput(*args: str) -> dict[str, dict[str, float]]:
    """The benchmark's table, as {optimizer: {column: value}}."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_throughput", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, check=True).stdout.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("optimizer"))
    columns = out[header].split()[1:]
    rows = {}
    for line in out[header + 1:]:
        name, *cells = line.split()
        rows[name] = dict(zip(columns, (float(c.replace(",", "")) for c in cells)))
    return rows


@pytest.mark.slow
def test_the_benchmark_times_each_optimizer_config_and_splits_the_step_on_cpu():
    # A 256-token vocabulary: SOAP's eigenbases stay small (the tiny preset's 8192 would take a minute).
    rows = throughput("--preset", "tiny", "--vocab_size", "256", "--device", "cpu", "--no-compile", "--precision", "32-true",
                      "--batch_size", "2", "--seq_len", "32", "--steps", "3", "--warmup", "1",
                      "--optimizers", "adamw", "soap", "sgd_adalayer_last_norm")
    assert set(rows) == {"adamw", "soap", "sgd_adalayer_last_norm"}  # a routed config runs as fit runs it
    for row in rows.values():
        assert row["tokens/s"] > 0
        assert 0 < row["fwd_bwd_ms"] <= row["step_ms"] and 0 < row["optimizer_ms"] <= row["step_ms"]
    assert rows["soap"]["optimizer_ms"] > rows["adamw"]["optimizer_ms"]  # eigenbases and projections


@pytest.mark.gpu
@pytest.mark.slow
def test_the_150m_preset_reports_mfu_and_peak_memory_on_a_gpu():
    rows = throughput("--preset", "150m", "--steps", "5", "--warmup", "3", "--optimizers", "adamw")
    assert 0 < rows["adamw"]["MFU"] < 1
    assert 0 < rows["adamw"]["peak_GiB"] < 80
