"""The data path on local C4-format shards: packing, sharding, resume."""

import gzip
import json
import random
from itertools import islice

import pytest
import torch
from datasets import load_dataset

from lm_opt.data import STATE_KEY, Packer, PackedStream, ResumableLoader, local_data_files, validation_windows
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


def epoch0_tokens(stream: PackedStream, part: int, num_parts: int) -> list[int]:
    out = []
    for batch in stream.part_stream(part, num_parts):
        if batch[STATE_KEY]["state"]["epoch"] > 0:
            break
        out += batch["input_ids"].flatten().tolist()
    return out


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
    assert packer.carry() == [8, EOS]


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
