"""The data path on local C4-format shards: packing, sharding, resume, tokenizer threads."""

import gzip
import json
import logging
import os
import pickle
import random
from itertools import islice

import pytest
import torch
from datasets import load_dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from lm_opt.data import (STATE_KEY, C4DataModule, Packer, PackedStream, ResumableLoader, local_data_files,
                         validation_windows)
from lm_opt.errors import UserError

EOS = 1


class IntTokenizer:
    """Texts are space-separated token ids, so every packed token can be traced to its document."""

    eos_token_id = EOS

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}

    def __len__(self):
        return 10**6


def write_shards(root, n_docs=120, n_shards=4, seed=0):
    rng = random.Random(seed)
    docs = [[1000 * (i + 1) + j for j in range(rng.randint(1, 60))] for i in range(n_docs)]
    for split in ("train", "validation"):
        for s in range(n_shards):
            with gzip.open(root / f"c4-{split}.{s:05d}-of-{n_shards:05d}.json.gz", "wt") as f:
                for doc in docs[s::n_shards]:
                    f.write(json.dumps({"text": " ".join(map(str, doc)), "timestamp": "2019-04-25T00:00:00Z",
                                        "url": f"https://example.com/{doc[0]}"}) + "\n")
    return docs


@pytest.fixture
def corpus(tmp_path):
    docs = write_shards(tmp_path)
    return docs, load_dataset("json", data_files=local_data_files(str(tmp_path)), streaming=True)


class ThreadProbeTokenizer(PreTrainedTokenizerFast):
    """A real fast tokenizer that appends, for every call, its process id, whether it runs in a
    DataLoader worker, and the process's thread count before and after encoding to `log_path`."""

    log_path = None

    def __call__(self, *args, **kwargs):
        before = len(os.listdir("/proc/self/task"))
        out = super().__call__(*args, **kwargs)
        in_worker = torch.utils.data.get_worker_info() is not None
        with open(self.log_path, "a") as f:
            f.write(f"{os.getpid()} {int(in_worker)} {before} {len(os.listdir('/proc/self/task'))}\n")
        return out


def probe_tokenizer(docs: list[list[int]], log_path) -> ThreadProbeTokenizer:
    """A word-level fast tokenizer over the tokens of `docs`, with T5's pad, eos and unk ids."""
    words = sorted({str(t) for doc in docs for t in doc})
    vocab = {"<pad>": 0, "</s>": EOS, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = ThreadProbeTokenizer(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.log_path = str(log_path)
    return tokenizer


def epoch0_tokens(stream: PackedStream, part: int, num_parts: int) -> list[int]:
    out = []
    for batch in stream.part_stream(part, num_parts):
        out += batch["input_ids"].flatten().tolist()
        position = batch[STATE_KEY]["state"]
        if position["epoch"] > 0:
            # The first position in epoch 1 names its first document batch: what it skips is
            # what this batch took from epoch 1.
            assert position["docs"] is None
            return out[: len(out) - position["skip"]]


def split_docs(tokens: list[int]) -> list[list[int]]:
    docs, current = [], []
    for t in tokens:
        if t == EOS:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs + ([current] if current else [])


def test_packer_emits_full_windows_and_carries_the_rest():
    packer = Packer()
    packer.add([[5, 6, 7], [8]], eos_id=EOS)
    assert packer.pop(1, 4).tolist() == [[5, 6, 7, EOS]]
    assert packer.pop(1, 4) is None
    assert packer.buffer.tolist() == [8, EOS]
    assert (packer.emitted, packer.read) == (4, 6)


def test_a_packer_told_to_skip_drops_that_many_tokens_across_adds():
    packer = Packer(skip=5)
    packer.add([[5, 6, 7]], eos_id=EOS)
    packer.add([[8, 9]], eos_id=EOS)
    assert packer.buffer.tolist() == [9, EOS]
    assert (packer.emitted, packer.read) == (5, 7)


@pytest.mark.parametrize("world_size,num_parts", [(1, 1), (2, 2), (3, 1)])
def test_ranks_and_workers_read_disjoint_parts_that_cover_the_stream(corpus, world_size, num_parts):
    docs, ds = corpus
    seen = []
    for rank in range(world_size):
        stream = PackedStream(ds["train"], IntTokenizer(), seq_len=7, batch_size=2, rank=rank, world_size=world_size)
        for part in range(num_parts):
            pieces = split_docs(epoch0_tokens(stream, part, num_parts))
            # Documents arrive whole and in order, except the last, which the next window continues.
            whole, last = pieces[:-1], pieces[-1]
            assert all(p in docs for p in whole)
            assert any(d[: len(last)] == last for d in docs)
            seen += [p[0] // 1000 for p in whole]
    assert len(seen) == len(set(seen)), "a document was read by two ranks or workers"
    # Each part may hold back less than one batch of tokens, about one document.
    assert len(seen) >= len(docs) - 2 * world_size * num_parts


def test_no_token_is_lost_or_repeated_at_window_boundaries(corpus):
    docs, ds = corpus
    stream = PackedStream(ds["train"], IntTokenizer(), seq_len=5, batch_size=3, rank=0, world_size=1)
    tokens = epoch0_tokens(stream, 0, 1)
    # One part reads the shards in order: shard s holds docs[s::4].
    expected = [t for s in range(4) for doc in docs[s::4] for t in doc + [EOS]]
    assert tokens == expected[: len(tokens)]
    assert len(expected) - len(tokens) < 3 * 6, "more than one batch of tokens was held back"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_continues_with_the_next_unseen_batch(corpus, num_workers):
    _, ds = corpus

    def loader():
        stream = PackedStream(ds["train"], IntTokenizer(), seq_len=7, batch_size=2, rank=0, world_size=1)
        return ResumableLoader(stream, num_workers=num_workers)

    def take(dl, n):
        out = []
        for batch in islice(iter(dl), n):
            dl.commit(batch.pop(STATE_KEY))
            out.append(batch["input_ids"])
        return out

    uninterrupted = take(loader(), 30)
    first = loader()
    head = take(first, 13)  # an odd count, so the next batch comes from the second worker
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = take(resumed, 17)
    for a, b in zip(uninterrupted, head + tail):
        assert torch.equal(a, b)


def test_resume_continues_exactly_where_the_leftover_spans_an_epoch_boundary(corpus):
    _, ds = corpus

    def stream(states=None):
        s = PackedStream(ds["train"], IntTokenizer(), seq_len=7, batch_size=2, rank=0, world_size=1)
        s.part_states = states or {}
        return s.part_stream(0, 1)

    uninterrupted = list(islice(stream(), 400))
    positions = [b[STATE_KEY]["state"] for b in uninterrupted]
    first_in_epoch1 = next(i for i, p in enumerate(positions) if p["epoch"] == 1)
    assert positions[first_in_epoch1]["skip"] > 0, "no batch spans the epoch boundary"
    for head in (first_in_epoch1 - 1, first_in_epoch1, first_in_epoch1 + 1):
        resumed = stream({0: positions[head - 1]})
        for expected in uninterrupted[head: head + 6]:
            assert torch.equal(next(resumed)["input_ids"], expected["input_ids"])


def test_a_batch_carries_a_small_position_not_its_leftover_tokens(corpus):
    _, ds = corpus
    stream = PackedStream(ds["train"], IntTokenizer(), seq_len=300, batch_size=3, rank=0, world_size=1)
    for batch in islice(stream.part_stream(0, 1), 3):
        assert len(pickle.dumps(batch[STATE_KEY])) < 1000  # behind them are ~200 to ~1100 leftover ints


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_dataloader_workers_tokenize_on_several_threads(tmp_path, monkeypatch):
    """tokenizers turns its threads off in a process forked after its parent encoded on several
    (conftest turns them off for the tests; here they are on). The main process must not encode
    before the loader forks its workers, and each worker's first batch starts rayon's threads."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    docs = write_shards(tmp_path)
    calls_log = tmp_path / "calls.txt"
    dm = C4DataModule(path=str(tmp_path), seq_len=7, batch_size=2, num_workers=2, val_sequences=4)
    dm.tokenizer = probe_tokenizer(docs, calls_log)
    dm.setup("fit")
    assert next(iter(dm.val_dataloader()))["input_ids"].shape == (2, 8)
    list(islice(dm.train_dataloader(), 2))  # one batch from each worker
    calls = [tuple(map(int, line.split())) for line in calls_log.read_text().splitlines()]
    assert not [c for c in calls if c[0] == os.getpid()], "the main process encoded before its workers forked"
    first_call = {}
    for pid, in_worker, before, after in calls:
        if in_worker:
            first_call.setdefault(pid, (before, after))
    assert len(first_call) == 2
    assert all(after > before for before, after in first_call.values()), first_call


@pytest.mark.parametrize("world_size,num_workers,fix", [(1, 3, "data.num_workers: 2"), (3, 2, "device count"),
                                                       (2, 2, None)])
def test_shards_that_do_not_divide_over_ranks_and_workers_are_named(corpus, caplog, world_size, num_workers, fix):
    _, ds = corpus
    stream = PackedStream(ds["train"], IntTokenizer(), seq_len=7, batch_size=2, rank=0, world_size=world_size)
    with caplog.at_level(logging.WARNING, logger="lm_opt"):
        ResumableLoader(stream, num_workers=num_workers)
    messages = [r.getMessage() for r in caplog.records]
    if fix is None:  # 4 shards over 2 ranks x 2 workers
        assert not messages
    else:
        (message,) = messages
        assert f"4 train shards do not divide over {world_size} ranks x {num_workers} workers" in message
        assert fix in message


def test_validation_windows_are_fixed_and_complete(corpus):
    _, ds = corpus
    a = validation_windows(ds["validation"], IntTokenizer(), seq_len=7, n_windows=10)
    b = validation_windows(ds["validation"], IntTokenizer(), seq_len=7, n_windows=10)
    assert a.shape == (10, 8) and torch.equal(a, b)
    with pytest.raises(ValueError, match="val_sequences=100000"):
        validation_windows(ds["validation"], IntTokenizer(), seq_len=7, n_windows=100000)


def test_a_directory_without_shards_is_named(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        local_data_files(str(tmp_path))
    with pytest.raises(UserError, match="neither"):
        local_data_files(str(tmp_path / "missing"))
