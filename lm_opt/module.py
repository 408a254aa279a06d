"""The LightningModule: next-token loss plus z-loss, the study's LR schedule, metrics.

The module owns no particular optimizer: an optimizer callback (lm_opt.callbacks.optimizer)
hands it a factory that builds the optimizer from the model's parameters and their roles. What else
the optimizer needs of the schedule it says through lm_opt.optim.hooks.
"""

import ctypes
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric

from lm_opt.model import GPT, ModelConfig, lm_loss
from lm_opt.optim import hooks
from lm_opt.parallel import shard
from lm_opt.schedule import lr_factor

OptimizerFactory = Callable[[GPT], torch.optim.Optimizer]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed large blocks for reuse instead of returning them to the OS.

    PyTorch's CPU tensors come from malloc, which maps each block over its threshold (at most
    32 MB) afresh and unmaps it when freed: every training step of the `cpu` preset then faults its
    (tokens, vocabulary) logits, their gradients and the activations in again, zero-filled page by
    page: 63k page faults (250 MB) a step, against under 2k with the thresholds raised (measured
    with getrusage). A no-op off Linux or without glibc.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


class LMModule(L.LightningModule):
    def __init__(
        self,
        preset: str = "tiny",
        qk_norm: bool = True,
        z_loss: float = 1e-4,
        arch: dict[str, Any] | None = None,
        warmup: float = 0.1,
        min_lr_ratio: float = 0.1,
        max_tokens: int | None = None,
        tokens_per_param: float | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            preset: Model size: `tiny`, `150m`, `300m`, `600m` or `1.2b` (lm_opt.model.PRESETS).
            qk_norm: LayerNorm on queries and keys (the study sweeps with and without it).
            z_loss: Coefficient of `logsumexp(logits)**2` in the loss; 0 turns it off.
            arch: Further ModelConfig fields to override, e.g. `{n_layer: 4, block_size: 1024}`.
            warmup: Linear warmup from min_lr_ratio*lr to lr, as a fraction of the run (< 1) or in steps.
            min_lr_ratio: Where the warmup starts and the cosine decay ends, relative to the peak lr.
            max_tokens: Run length in tokens (sets trainer.max_steps); exclusive with tokens_per_param.
            tokens_per_param: Run length as tokens per parameter (20 is Chinchilla's, the study's).
            compile: Compile the model and the loss with torch.compile (under FSDP2: each block,
                and the loss on its own).
            activation_checkpointing: Recompute each block's activations in backward (less memory,
                about a third more compute).
        """
        super().__init__()
        if warmup < 0:
            raise ValueError(f"model.warmup must be >= 0, got {warmup}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.save_hyperparameters()
        self.config = ModelConfig.from_name(preset, qk_norm=qk_norm, z_loss=z_loss, **(arch or {}))
        self.model = GPT(self.config)
        self.val_loss = MeanMetric()
        self.optimizer_factory: OptimizerFactory | None = None
        self.loss_fn = lm_loss
        self.compiled_or_sharded = False
        self.tokens_logged_at = 0

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device.type if self._trainer is not None else None
        if device == "cuda":
            # TF32 for the float32 matmuls left under bf16 autocast: SOAP's and Shampoo's projections.
            torch.set_float32_matmul_precision("high")
        elif device == "cpu":
            keep_freed_memory()
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None) if self._trainer else None
        if tokenizer is not None and len(tokenizer) > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but model.vocab_size is "
                             f"{self.config.vocab_size} (preset {self.hparams.preset!r}): set "
                             "model.arch.vocab_size, or data.embedded_vocab to match the preset")

    def configure_model(self) -> None:
        """Checkpointing, compilation and, under FSDP2Strategy, sharding: names stay unchanged."""
        if self.compiled_or_sharded:
            return  # fit, then validate or test, in one process
        self.compiled_or_sharded = True
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        sharded = self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)
        if self.hparams.compile and sharded:
            for block in self.model.blocks:
                block.compile()  # per block, as FSDP2 gathers and frees per block
            self.loss_fn = torch.compile(lm_loss)
        elif self.hparams.compile:
            # One graph of model and loss: the float32 logits are never materialized.
            self._losses = torch.compile(self._losses)
        if sharded:
            shard(self.model, self.device_mesh["data_parallel"], str(self.trainer.precision))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["input_ids"].long()
        logits = self.model(tokens[:, :-1])
        return self.loss_fn(logits, tokens[:, 1:], self.config.z_loss)

    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all devices."""
        return self.trainer.datamodule.tokens_per_step(self.trainer)

    @property
    def flops_per_batch(self) -> float:
        """Training FLOPs of one batch on one device, for TokenThroughput's MFU."""
        dm = self.trainer.datamodule
        tokens = dm.hparams.batch_size * dm.hparams.seq_len
        return self.model.flops_per_token(dm.hparams.seq_len) * tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, z = self._losses(batch)
        # Logged tensors stay on the device; Lightning reads them only at log_every_n_steps, and
        # the progress bar at its refresh rate.
        self.log("train/loss", ce, prog_bar=True)
        self.log("train/z_loss", z)
        return ce + z

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Tokens seen derive from the step (batches have a fixed size): written straight to the
        # logger at its logging steps, never copied to the device. Lightning writes step k's
        # metrics at x = k - 1, so the points line up with train/loss.
        step = self.global_step
        if self.logger and step != self.tokens_logged_at and step % self.trainer.log_every_n_steps == 0:
            self.logger.log_metrics({"train/tokens": step * self.tokens_per_step()}, step=step - 1)
            self.tokens_logged_at = step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ce, _ = self._losses(batch)
        n_tokens = batch["input_ids"][:, 1:].numel()
        # A token-weighted mean whose sums torchmetrics reduces across ranks.
        self.val_loss.update(ce, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", loss.exp(), sync_dist=False)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning does, minus its refusal of fused optimizers under mixed precision: that
        guards fp16's gradient scaler, which bf16 has not (the scaler unscales before this hook).
        Sharded (DTensor) gradients are clipped by their global norm."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_factory is None:
            raise RuntimeError(
                "no optimizer is configured: add lm_opt.callbacks.OptimizerCallback to trainer.callbacks, "
                "e.g. `--config configs/optim/adamw.yaml`"
            )
        optimizer = self.optimizer_factory(self.model)
        schedule = partial(lr_factor, total_steps=self.trainer.max_steps, warmup=self.hparams.warmup,
                           min_ratio=self.hparams.min_lr_ratio, hold_steps=hooks.hold_steps([optimizer]))
        # LambdaLR scales each param group's own initial lr, so routes keep their own peaks.
        scheduler = LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
