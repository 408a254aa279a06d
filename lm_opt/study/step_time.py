"""Seconds per training step of optimizer setups, side by side in one process: the real
LightningModule on random tokens (no data pipeline), each setup in turn, in alternating rounds
since a shared CPU's speed drifts (other jobs, heat). The card's step-time ratio and
benchmarks.train_step read these; benchmarks.cpu_train profiles the same loop."""

import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from lm_opt.callbacks import OptimizerCallback
from lm_opt.module import LMModule


class RandomTokens(L.LightningDataModule):
    """Fixed-size batches of random token ids, already in memory."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, batches: int):
        super().__init__()
        self.save_hyperparameters()
        generator = torch.Generator().manual_seed(0)
        self.data = [{"input_ids": torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)}
                     for _ in range(batches)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None, pin_memory=torch.cuda.is_available())

    def tokens_per_step(self, trainer: L.Trainer) -> int:
        return self.hparams.batch_size * self.hparams.seq_len * trainer.world_size * trainer.accumulate_grad_batches


class StepWindow(L.Callback):
    """Times the `steps` steps after the first `skip`; with `profile_steps`, profiles that many
    steps from `skip` instead."""

    def __init__(self, skip: int, steps: int, profile_steps: int = 0):
        self.skip, self.steps, self.profile_steps = skip, steps, profile_steps
        self.start = self.end = self.profiler = None

    def on_train_batch_start(self, trainer, *_):
        if trainer.global_step == self.skip:
            if self.profile_steps:
                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *_):
        if self.start is not None and trainer.global_step == self.skip + (self.profile_steps or 10**9):
            self.end = time.perf_counter()
            self.profiler.__exit__(None, None, None)
        elif self.profiler is None:
            self.end = time.perf_counter()

    @property
    def seconds_per_step(self) -> float:
        return (self.end - self.start) / (self.profile_steps or self.steps)


def train_steps(module: LMModule, precision: str, optimizer: OptimizerCallback, batch_size: int, seq_len: int,
                warmup: int, steps: int, profile_steps: int = 0) -> StepWindow:
    """`warmup + steps` steps of `module` on random tokens, gradients clipped to 1 as in training;
    the window times (or profiles) the steps after `warmup`."""
    window = StepWindow(warmup, steps, profile_steps)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=warmup + steps, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[optimizer, window])
    trainer.fit(module, datamodule=RandomTokens(module.config.vocab_size, batch_size, seq_len, warmup + steps))
    return window


def side_by_side(setups: dict[str, Callable[[], OptimizerCallback]], preset: str, precision: str, batch_size: int,
                 seq_len: int, steps: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each setup (a factory of its OptimizerCallback), one list entry per
    round; the order alternates round by round and every setup starts from the same weights."""
    seconds: dict[str, list[float]] = {label: [] for label in setups}
    for round_ in range(rounds):
        for label in list(setups)[:: 1 if round_ % 2 == 0 else -1]:
            torch.manual_seed(0)
            window = train_steps(LMModule(preset=preset), precision, setups[label](), batch_size, seq_len, warmup,
                                 steps)
            seconds[label].append(window.seconds_per_step)
    return seconds


def medians(seconds: dict[str, list[float]]) -> dict[str, float]:
    return {label: statistics.median(values) for label, values in seconds.items()}
