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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    args.skip = 5
    batches = random_batches(args.steps, args.batch_size, args.seq_len)
    timed = TimedQuantiles(every_n_steps=args.every)
    with tempfile.TemporaryDirectory() as logs:
        steps_per_s = lightning_steps_per_s(batches, args.steps, args.skip, args, [timed],
                                            logger=TensorBoardLogger(logs, name="bench"))
    per_event = timed.seconds / timed.events
    step = 1 / steps_per_s
    print("| | seconds |")
    print("| --- | --- |")
    print(f"| training step (tiny, batch {args.batch_size} x {args.seq_len}) | {step:.3f} |")
    print(f"| one quantile logging event ({timed.events} measured) | {per_event:.3f} |")
    print(f"| overhead at every_n_steps=50 | {100 * per_event / (50 * step):.2f}% |")


if __name__ == "__main__":
    main()
