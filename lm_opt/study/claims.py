"""Claims: one process at a time on each point of a sweep folder that several sweeps share.

Two terminals, or a Slurm array beside a local sweep, may run one sweep's spec at once: each point
runs once, in whichever process claims it first, and the others take its result. A point's claim is
its run folder's lock (lm_opt.run_lock, flock(2)). `sweep`'s `execute` takes it before it writes the
point's log or launches the point, and hands it to the point's command.sh with its open descriptor
(`FD_ENV`), so that `fit` inherits the lock instead of taking another: the lock then lives while
either the sweep or the point's `fit` does, from before command.sh looks at the folder until the
run's last file is written, and ends with the later of the two, even if the sweep is killed alone.
The sweep lets go once it has read the point's outcome and settled it (commit, checkpoints).

A point that another live process holds is left to it, said so once ("held by pid N on host H"),
and tried again every RECHECK_S until that process lets go: then its result is taken if it is
done, or it runs here (its holder died or stopped first). So `execute` returns only once every
point has ended somewhere, and what needs a line's whole grid (the seed repeats at its best point,
`best_of` and `seed_points`, the stable-range repeats, a card's lr grid) sees it whole without
running any point twice; a sweep whose other points are held elsewhere waits for them.
"""

import time
from pathlib import Path

from lm_opt.run_lock import RunLock, holder_of, try_lock
from lm_opt.study.reuse import copy_record
from lm_opt.study.sweep_plan import Point
from lm_opt.study.sweep_point import point_state, read_status, write_point

RECHECK_S = 1.0
"""How often a point that another process holds is tried again."""


class Claims:
    """The points of one `execute` still to start, in order, each started only under its lock: a
    point that another live process holds is left to it and tried again until that process lets go."""

    def __init__(self, points: list[Point]):
        self.waiting = list(enumerate(points, 1))
        self.total = len(points)
        self.held: dict[str, tuple[str, float]] = {}
        """Point name -> who held it when last tried, and when to try it again."""

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def next(self, results: dict[str, str | None]) -> tuple[int, Point, RunLock] | None:
        """The next waiting point that this process can run, and its lock; None while none is free.
        A point that ended done in another process meanwhile is taken as done (into `results`)."""
        for item in list(self.waiting):
            i, point = item
            if self.held.get(point.name, ("", 0.0))[1] > time.time():
                continue
            lock = try_lock(point.run_dir, "sweep")
            if lock is None:
                holder = holder_of(point.run_dir)
                if point.name not in self.held:
                    print(f"[{i}/{self.total}] {point.name}: held by {holder}; left to it, and tried again until "
                          "it ends", flush=True)
                self.held[point.name] = (holder, time.time() + RECHECK_S)
                continue
            self.waiting.remove(item)
            if point_state(point.run_dir) != "done":
                return i, point, lock
            lock.release()
            results[point.name] = None
            by = self.held.get(point.name, ("another process",))[0]
            print(f"[{i}/{self.total}] {point.name}: {read_status(point.run_dir)}, run by {by}", flush=True)
        return None


def copy_if_free(point: Point, source: Path, sweep: str) -> bool:
    """Copy `source`'s record into the point's folder, under the point's lock, unless another process
    holds it or has started it meanwhile (then `execute` leaves it to that process or runs it)."""
    lock = try_lock(point.run_dir, "sweep")
    if lock is None:
        return False
    try:
        if point_state(point.run_dir) != "start":
            return False
        copy_record(source, point)
        write_point(point, sweep, copied_from=source)
        return True
    finally:
        lock.release()
