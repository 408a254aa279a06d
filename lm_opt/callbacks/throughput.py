"""Tokens/s and MFU through Lightning's ThroughputMonitor."""

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def _sequences(batch: dict[str, Any]) -> int:
    return batch["input_ids"].size(0)


def _tokens(batch: dict[str, Any]) -> int:
    # Each window of seq_len + 1 tokens trains on seq_len targets.
    return batch["input_ids"][:, 1:].numel()


class TokenThroughput(ThroughputMonitor):
    """ThroughputMonitor for packed LM batches: logs `throughput/device/items_per_sec` (tokens/s
    per device), the same across devices, and MFU from the module's `flops_per_batch` where
    Lightning knows the device's peak FLOP/s (GPUs)."""

    def __init__(self, window_size: int = 50):
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size, separator="/")
