"""Tokens/s and MFU through Lightning's ThroughputMonitor."""

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

DENSE_BF16_FLOPS = {"h200": 989.4e12}
"""Peak dense bf16 FLOP/s of GPUs whose plain CUDA name Lightning does not know. An H200 (SXM)
reports itself as 'NVIDIA H200', which Lightning 2.6 cannot place (it knows 'h200 sxm1' and
'h200 nvl1', with figures counted with sparsity): its tensor cores are the H100 SXM's."""


def _sequences(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    # Each window of seq_len + 1 tokens trains on seq_len targets.
    return batch["input_ids"][:, 1:].numel()


def dense_peak_flops(device: torch.device) -> float | None:
    """DENSE_BF16_FLOPS of the device by its name; None for a device Lightning places itself."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for chip, flops in DENSE_BF16_FLOPS.items() if chip in name), None)


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor for packed LM batches: logs `throughput/device/items_per_sec` (tokens/s
    per device), the same across devices, and MFU from the module's `flops_per_batch` against the
    device's peak FLOP/s: Lightning's figure, or DENSE_BF16_FLOPS for a bf16 run on a GPU Lightning
    does not place."""

    def __init__(self, window_size: int = 50):
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size, separator="/")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None and "bf16" in str(trainer.precision):
            peak = dense_peak_flops(trainer.strategy.root_device)
            self.available_flops = peak
            for throughput in self._throughputs.values():
                throughput.available_flops = peak
