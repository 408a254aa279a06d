"""MFU's denominator: Lightning's peak FLOP/s, or lm_opt's where Lightning cannot place the GPU."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.trainer.states import RunningStage

from lm_opt.callbacks.throughput import TokenThroughput


def setup(callback: TokenThroughput, device: str, precision: str) -> TokenThroughput:
    plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else Precision()
    trainer = SimpleNamespace(precision_plugin=plugin, precision=precision, world_size=1, enable_validation=True,
                              strategy=SimpleNamespace(root_device=torch.device(device)),
                              state=SimpleNamespace(stage=RunningStage.TRAINING))
    callback.setup(trainer, None, "fit")
    return callback


def peaks(callback: TokenThroughput) -> set:
    return {t.available_flops for t in callback._throughputs.values()} | {callback.available_flops}


def test_an_h200_by_its_plain_name_gets_its_dense_bf16_peak(monkeypatch):
    """Lightning 2.6 knows no 'NVIDIA H200' (what an H200 SXM reports), so MFU was not logged there."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    with pytest.warns(UserWarning, match="FLOPs not found"):
        assert peaks(setup(TokenThroughput(), "cuda:0", "bf16-mixed")) == {989.4e12}
    with pytest.warns(UserWarning, match="FLOPs not found"):
        assert peaks(setup(TokenThroughput(), "cuda:0", "32-true")) == {None}  # no fp32 figure of ours


def test_a_cpu_has_no_peak():
    assert peaks(setup(TokenThroughput(), "cpu", "bf16-mixed")) == {None}
