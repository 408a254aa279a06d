"""Epochs past the first: the same documents reshuffled, exact resumption anywhere in them, a corpus
cut to its first documents, and the passes a run's record names."""

from itertools import islice

import pytest
import torch
from datasets import load_dataset

from cli_helpers import fit, scalars, stop_at, summary, tiny_args
from lm_opt.data import STATE_KEY, PackedStream, ResumableLoader, local_data_files
from lm_opt.data_order import epoch_batches, window_order
from test_data import IntTokenizer, write_shards


@pytest.fixture
def corpus(tmp_path):
    docs = write_shards(tmp_path, n_docs=60, n_shards=2)
    return docs, load_dataset("json", data_files=local_data_files(str(tmp_path)), streaming=True)


def stream(ds, window=16, documents=None, states=None):
    s = PackedStream(ds["train"], IntTokenizer(), seq_len=7, batch_size=2, rank=0, world_size=1, tokenize_batch=5,
                     reshuffle_window=window, documents=documents)
    s.part_states = states or {}
    return s


def epoch_texts(ds, epoch, window=16, limit=None):
    """The documents epoch `epoch` reads, in order, each by its first token (its id)."""
    batches = epoch_batches(ds["train"], epoch, {}, batch_size=5, window=window, limit=limit)
    return [int(text.split()[0]) for _, texts in batches for text in texts]


def test_epoch0_keeps_the_stream_order_and_later_epochs_reshuffle_the_same_documents(corpus):
    docs, ds = corpus
    in_order = [doc[0] for s in range(2) for doc in docs[s::2]]  # one part reads the shards in order
    orders = [epoch_texts(ds, e) for e in (0, 1, 2)]
    assert orders[0] == in_order
    assert sorted(orders[1]) == sorted(orders[2]) == sorted(in_order)
    assert orders[1] != in_order and orders[2] != orders[1]


def test_a_window_is_permuted_alike_whenever_it_is_read_again():
    assert (window_order(3, 7, 50) == window_order(3, 7, 50)).all()
    assert (window_order(0, 7, 50) == range(50)).all() and not (window_order(1, 7, 50) == window_order(2, 7, 50)).all()


@pytest.mark.parametrize("window", [16, 64])
def test_resume_anywhere_past_the_first_epoch_continues_exactly(corpus, window):
    """Positions within a window, at a window's edge and across epochs 1 to 3 (16 documents: several
    windows an epoch; 64: one window holds the whole epoch)."""
    _, ds = corpus
    uninterrupted = list(islice(stream(ds, window).part_stream(0, 1), 600))
    positions = [b[STATE_KEY]["state"] for b in uninterrupted]
    assert positions[-1]["epoch"] >= 3
    later = [i for i, p in enumerate(positions) if p["epoch"] >= 1]
    for head in later[::37] + [i for i in later if positions[i]["offset"] == 0][:3]:
        resumed = stream(ds, window, states={0: positions[head - 1]}).part_stream(0, 1)
        for expected in uninterrupted[head: head + 8]:
            assert torch.equal(next(resumed)["input_ids"], expected["input_ids"])


def test_train_documents_repeats_the_first_documents_each_epoch(corpus):
    docs, ds = corpus
    first = [doc[0] for doc in docs[0::2][:12]]  # one part reads shard 0 first
    assert epoch_texts(ds, 0, limit=12) == first
    for epoch in (1, 2):
        assert sorted(epoch_texts(ds, epoch, window=5, limit=12)) == sorted(first)


def test_epochs_count_whole_passes_and_the_part_of_the_current_one(corpus):
    _, ds = corpus
    loader = ResumableLoader(stream(ds), num_workers=0)
    batches = iter(loader)
    for _ in range(5):
        loader.commit(next(batches)[STATE_KEY])
    assert loader.epochs() is None  # the size of a pass is unknown until one has ended
    while (state := next(batches)[STATE_KEY])["state"]["epoch"] < 2:
        loader.commit(state)
    loader.commit(state)
    position = state["state"]
    assert loader.epochs() == pytest.approx(2 + (position["tokens"] + position["skip"]) / position["epoch_tokens"])
    assert 2 < loader.epochs() < 2.1


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_past_the_first_ends_as_an_uninterrupted_one(tmp_path):
    """4 documents of the embedded corpus are about 4 steps of the tiny run: 12 steps are about 3
    passes, and the interruption at step 9 falls a quarter into the third (reshuffled) pass."""
    common = ("--data.train_documents", "4", "--data.reshuffle_window", "3", "--trainer.val_check_interval", "3")
    fit(*tiny_args(tmp_path, "full", 12, *common))
    fit(*tiny_args(tmp_path, "half", 12, *common, *stop_at(9)))
    fit(*tiny_args(tmp_path, "half", 12, *common, "--ckpt_path", "last"))
    full, resumed = scalars(tmp_path / "full", "train/loss"), scalars(tmp_path / "half", "train/loss")
    assert sorted(full) == sorted(resumed) == list(range(12))
    assert [full[s] for s in range(12)] == [resumed[s] for s in range(12)]
    assert summary(tmp_path / "half")["final_val_loss"] == summary(tmp_path / "full")["final_val_loss"]
    assert summary(tmp_path / "half")["epochs"] == summary(tmp_path / "full")["epochs"]
    assert 2.5 < summary(tmp_path / "full")["epochs"] < 4
