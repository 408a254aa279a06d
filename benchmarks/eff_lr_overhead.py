"""Overhead of effective-lr quantile tracking: the time spent inside EffectiveLRQuantiles per
logging step, against the time of a training step, projected to `every_n_steps=50`.

    python -m benchmarks.eff_lr_overhead [--steps 40] [--every 10]

Measured on the tiny preset with AdamW (one quantile set per parameter, 7 ranks selected from
every state tensor); TensorBoard histograms are included, the logger is TensorBoard in a temporary folder.
"""

import argparse
import tempfile
import time

from lightning.pytorch.loggers import TensorBoardLogger

from benchmarks.loop_overhead import lightning_steps_per_s, random_batches
from lm_opt.callbacks.effective_lr import EffectiveLRQuantiles


class TimedQuantiles(EffectiveLRQuantiles):
    """EffectiveLRQuantiles that adds up the wall time of its logging steps."""

    seconds, events = 0.0, 0

    def on_train_batch_end(self, trainer, *args):
        start = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        if trainer.global_step % self.every_n_steps == 0:
            self.seconds += time.perf_counter() - start
            self.events += 1


def arguments(doc: str) -> argparse.Namespace:
    """The overhead benchmarks' options; the first 5 steps are not timed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    args.skip = 5
    if args.every <= args.skip:
        parser.error(f"--every must exceed the {args.skip} untimed warmup steps, so every event is timed")
    return args


def steps_per_second(args: argparse.Namespace, callbacks: list) -> float:
    """Training steps per second of the tiny preset with AdamW and `callbacks`, logging to
    TensorBoard in a temporary folder."""
    batches = random_batches(args.steps, args.batch_size, args.seq_len)
    with tempfile.TemporaryDirectory() as logs:
        return lightning_steps_per_s(batches, args.steps, args.skip, args, callbacks,
                                     logger=TensorBoardLogger(logs, name="bench"))


def main():
    args = arguments(__doc__)
    timed = TimedQuantiles(every_n_steps=args.every)
    step = 1 / steps_per_second(args, [timed])
    per_event = timed.seconds / timed.events
    print("| | seconds |")
    print("| --- | --- |")
    print(f"| training step (tiny, batch {args.batch_size} x {args.seq_len}) | {step:.3f} |")
    print(f"| one quantile logging event ({timed.events} measured) | {per_event:.3f} |")
    print(f"| overhead at every_n_steps=50 | {100 * per_event / (50 * step):.2f}% |")


if __name__ == "__main__":
    main()
