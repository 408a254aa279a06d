"""Overhead of the update-size diagnostic: the time spent inside UpdateSizeQuantiles per logging step
(the copy of the parameters before the step, the norms and quantiles after it), against the time of
a training step, projected to `every_n_steps=50`; EffectiveLRQuantiles timed in the same run.

    python -m benchmarks.update_size_overhead [--steps 40] [--every 10]

Both callbacks log on the same steps, the logger is TensorBoard in a temporary folder; tiny preset,
AdamW (its effective lr is read from state: the two costs compare on one optimizer). The training
step is the run's step time less the callbacks' time, all measured side by side in one process, so a
load the machine carries besides slows both alike.
"""

import time

import torch

from benchmarks.eff_lr_overhead import TimedQuantiles, arguments, steps_per_second
from lm_opt.callbacks.update_size import UpdateSizeQuantiles


class TimedUpdateSize(UpdateSizeQuantiles):
    """UpdateSizeQuantiles that adds up the wall time of its copies and its logging events."""

    seconds, events = 0.0, 0

    def on_before_optimizer_step(self, trainer, *args):
        start = time.perf_counter()
        super().on_before_optimizer_step(trainer, *args)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, *args):
        logging = self.before is not None
        start = time.perf_counter()
        super().on_train_batch_end(trainer, *args)
        if logging:
            self.seconds += time.perf_counter() - start
            self.events += 1


def main():
    args = arguments(__doc__)
    sizes, eff_lr = TimedUpdateSize(every_n_steps=args.every), TimedQuantiles(every_n_steps=args.every)
    steps_per_s = steps_per_second(args, [eff_lr, sizes])
    timed = args.steps - args.skip
    step = (timed / steps_per_s - sizes.seconds - eff_lr.seconds) / timed
    per_size, per_eff = sizes.seconds / sizes.events, eff_lr.seconds / eff_lr.events
    print(f"| | seconds | overhead at every_n_steps=50 |")
    print("| --- | --- | --- |")
    print(f"| training step (tiny, batch {args.batch_size} x {args.seq_len}, AdamW, callbacks' time "
          f"taken out) | {step:.3f} | |")
    print(f"| one update-size event ({sizes.events} measured: copy + norms + quantiles) | {per_size:.3f} | "
          f"{100 * per_size / (50 * step):.2f}% |")
    print(f"| one eff_lr event ({eff_lr.events} measured, histograms included) | {per_eff:.3f} | "
          f"{100 * per_eff / (50 * step):.2f}% |")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")


if __name__ == "__main__":
    main()
