"""Lightning loop overhead: steps/s of lm_opt's LightningModule against a bare PyTorch loop.

Same tiny model, same in-memory batches, same AdamW, schedule, z-loss and gradient clipping;
the two loops alternate in one process, several rounds, and the medians are compared.

    python -m benchmarks.loop_overhead [--steps 25] [--rounds 4] [--batch_size 8] [--seq_len 128]
"""

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from lm_opt.callbacks import OptimizerCallback, TokenThroughput
from lm_opt.callbacks.divergence import DivergenceStop
from lm_opt.model import ModelConfig, lm_loss
from lm_opt.module import LMModule
from lm_opt.schedule import lr_factor

ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}}


class Batches(L.LightningDataModule):
    def __init__(self, batches, batch_size, seq_len):
        super().__init__()
        self.batches = batches
        self.save_hyperparameters({"batch_size": batch_size, "seq_len": seq_len})

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def tokens_per_step(self, trainer: L.Trainer) -> int:
        return self.hparams.batch_size * self.hparams.seq_len * trainer.accumulate_grad_batches


class StepTimer(L.Callback):
    """Wall time from the end of step `skip` to the end of the run (excludes warmup steps)."""

    def __init__(self, skip):
        self.skip, self.start, self.end = skip, None, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def lightning_steps_per_s(batches, steps, skip, args, extra_callbacks=(), logger=False) -> float:
    torch.manual_seed(0)
    module = LMModule(preset="tiny")
    timer = StepTimer(skip)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, gradient_clip_val=1.0, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, log_every_n_steps=10,
        callbacks=[OptimizerCallback(optimizer=ADAMW), TokenThroughput(), DivergenceStop(), *extra_callbacks, timer],
    )
    trainer.fit(module, datamodule=Batches(batches, args.batch_size, args.seq_len))
    return (steps - skip) / (timer.end - timer.start)


def bare_steps_per_s(batches, steps, skip) -> float:
    torch.manual_seed(0)
    model = LMModule(preset="tiny").model
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW["init_args"])
    scheduler = LambdaLR(optimizer, partial(lr_factor, total_steps=steps))
    for step, batch in enumerate(batches[:steps]):
        if step == skip:
            start = time.perf_counter()
        tokens = batch["input_ids"].long()
        ce, z = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.config.z_loss)
        optimizer.zero_grad(set_to_none=True)
        (ce + z).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return (steps - skip - 1) / (time.perf_counter() - start)


def random_batches(n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Token ids drawn from the tiny preset's vocabulary."""
    vocab = ModelConfig.from_name("tiny").vocab_size
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen, dtype=torch.int32)}
            for _ in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=5, help="warmup steps not timed")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    batches = random_batches(args.steps, args.batch_size, args.seq_len)
    lightning, bare = [], []
    for round_ in range(args.rounds):
        # Alternate which loop goes first: a CPU's speed drifts within a process (allocator, heat).
        runs = [(lightning, lambda: lightning_steps_per_s(batches, args.steps, args.skip, args)),
                (bare, lambda: bare_steps_per_s(batches, args.steps, args.skip))]
        for results, measure in runs[:: 1 if round_ % 2 == 0 else -1]:
            results.append(measure())
    lit, raw = statistics.median(lightning), statistics.median(bare)
    print(f"| loop | steps/s (median of {args.rounds}) | relative |")
    print("| --- | --- | --- |")
    print(f"| bare PyTorch | {raw:.3f} | 1.00 |")
    print(f"| lm_opt (Lightning) | {lit:.3f} | {lit / raw:.3f} |")
    print(f"Lightning overhead: {100 * (1 - lit / raw):+.1f}% (tiny, batch {args.batch_size} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
