"""Which documents an epoch of the training stream reads, in which order, and where each batch of
them sits, so that a run past its first epoch sees the data reshuffled and still resumes exactly.

The first epoch reads the stream in its own order (C4's shards are shuffled already, and every
record made within one epoch stays valid). Every later epoch reads `window` documents at a time and
permutes each window with a generator seeded by (epoch, window index): the same permutation
whenever a resumed run reads that window again. A window as large as a part's documents (the
embedded corpus holds 6,491) reshuffles the whole part each epoch. `limit` keeps the first `limit`
documents of every epoch, a smaller corpus that the run repeats (the repetition check of
configs/sweeps/repetition.yaml).
"""

from collections.abc import Iterator

import numpy as np
from datasets import IterableDataset as HFIterableDataset

START = {"docs": None, "window": 0, "offset": 0, "read": 0}
"""The position of an epoch's first batch: the documents' state before the window (None at the start
of an epoch), the window's index, the batch's first document in the (permuted) window, and the
documents of the epoch read before the window."""


def window_order(epoch: int, index: int, size: int) -> np.ndarray:
    """The order in which an epoch reads window `index` of `size` documents: as stored in epoch 0,
    a permutation seeded by (epoch, index) in every later one."""
    if epoch == 0:
        return np.arange(size)
    return np.random.default_rng([epoch, index]).permutation(size)


def epoch_batches(docs: HFIterableDataset, epoch: int, start: dict, batch_size: int, window: int,
                  limit: int | None = None) -> Iterator[tuple[dict, list[str]]]:
    """The texts of epoch `epoch` in batches of `batch_size`, from `start` (a batch's position, or
    START), each with its own position: where re-reading resumes the epoch at that batch."""
    start = {**START, **start}
    if start["docs"] is not None:
        docs.load_state_dict(start["docs"])
    docs.set_epoch(epoch)
    before, index, offset, read = start["docs"], start["window"], start["offset"], start["read"]
    window = window if epoch > 0 else batch_size  # epoch 0's positions stay those of its batches
    for chunk in docs.iter(batch_size=window):
        texts = chunk["text"][:None if limit is None else limit - read]
        texts = [texts[i] for i in window_order(epoch, index, len(texts))]
        for first in range(offset, len(texts), batch_size):
            yield {"docs": before, "window": index, "offset": first, "read": read}, texts[first:first + batch_size]
        before, index, offset, read = docs.state_dict(), index + 1, 0, read + len(texts)
        if limit is not None and read >= limit:
            return
