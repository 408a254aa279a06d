"""`trainer.precision: auto` (lm_opt.precision): bf16 where the device computes it natively, float32
elsewhere; an explicit bf16 on a CPU that emulates it runs, after one warning of its cost."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import tiny_args
from lm_opt import precision

ROOT = Path(__file__).parent.parent
EMULATED = {"capability": "AVX2", "avx512_bf16": False, "amx": False, "bf16_native": False}


def test_auto_is_float32_on_a_cpu_that_reports_no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: EMULATED)
    choice = precision.resolve("auto", "cpu")
    assert choice.precision == "32-true" and "no native bf16" in choice.reason
    assert precision.resolve("auto", "auto").precision == "32-true"  # no GPU here: the CPU decides


def test_auto_is_bf16_where_the_cpu_reports_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: EMULATED | {"capability": "AVX512", "bf16_native": True})
    assert precision.resolve("auto", "cpu") == precision.Choice("bf16-mixed", "auto: cpu computes bf16 natively")


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_a_gpu_follows_its_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert precision.resolve("auto", "gpu").precision == expected


def test_an_explicit_precision_is_kept_and_emulated_bf16_is_warned_of_once_with_its_cost(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: EMULATED)
    monkeypatch.setattr(precision, "matmul_rates", lambda: {"float32": 124.0, "bfloat16": 1.0})
    choice = precision.resolve("bf16-mixed", "cpu")
    assert choice == precision.Choice("bf16-mixed", "as configured")
    with caplog.at_level(logging.WARNING, logger="lm_opt"):
        trainer = precision.Trainer(precision="bf16-mixed", accelerator="cpu", logger=False,
                                    enable_progress_bar=False, enable_model_summary=False)
    assert str(trainer.precision) == "bf16-mixed"
    [warning] = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert "1 GFLOP/s" in warning and "124" in warning and "--trainer.precision auto" in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_opt"):
        precision.Trainer(precision="32-true", accelerator="cpu", logger=False)
    assert not caplog.records


def test_kinds_compare_on_the_arithmetic_and_read_as_words():
    native = EMULATED | {"capability": "AVX512", "avx512_bf16": True, "bf16_native": True}
    assert precision.same_kind(native, dict(native, source="stated after the run"))
    assert not precision.same_kind(native, EMULATED) and not precision.same_kind(native, None)
    assert precision.describe(native) == "AVX512 + AVX512-BF16 (native bf16)"
    assert precision.describe(EMULATED) == "AVX2 (bf16 emulated)" and precision.describe(None) == "unknown"


@pytest.mark.slow
def test_the_quickstart_trains_in_float32_where_onednn_is_held_to_avx2(tmp_path):
    """A real CPU without native bf16, as far as torch can tell: oneDNN and ATen held to AVX2
    (an AVX2-only EPYC reports the same and emulates bf16 matmuls at 1 GFLOP/s)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    subprocess.run([sys.executable, "-m", "lm_opt", *tiny_args(tmp_path, "avx2", 2)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    device = json.loads((tmp_path / "avx2" / "summary.json").read_text())["provenance"]["device"]
    assert device["precision"] == "32-true" and device["precision_reason"].startswith("auto: cpu has no native")
    assert device["arithmetic"]["capability"] == "AVX2" and device["arithmetic"]["bf16_native"] is False
