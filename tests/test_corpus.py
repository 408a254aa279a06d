import gzip
import json
import re
from pathlib import Path

import pytest
from datasets import load_dataset

from lm_opt import corpus
from lm_opt.corpus import (build_corpus, default_cache_dir, docstrings, is_prose, iter_texts,
                           split_of)

SMALL = {"max_bytes": 1_000_000, "n_train_shards": 2, "n_val_shards": 1}


def read_records(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    out_dir = tmp_path_factory.mktemp("corpus")
    return out_dir, build_corpus(out_dir, **SMALL)


def test_shards_are_gzip_json_lines_in_c4_schema(small_corpus):
    out_dir, files = small_corpus
    assert [Path(f).name for f in files["train"]] == ["c4-train.00000-of-00002.json.gz",
                                                      "c4-train.00001-of-00002.json.gz"]
    assert [Path(f).name for f in files["validation"]] == ["c4-validation.00000-of-00001.json.gz"]
    total = 0
    for path in files["train"] + files["validation"]:
        records = read_records(path)
        assert records
        for record in records:
            assert list(record) == ["text", "timestamp", "url"]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["timestamp"])
            assert record["url"].startswith("file://")
            assert is_prose(record["text"])
            total += len(record["text"].encode("utf-8"))
    assert 0.8 * SMALL["max_bytes"] < total <= SMALL["max_bytes"]


def test_train_and_validation_are_disjoint(small_corpus):
    _, files = small_corpus
    records = {split: [r for f in paths for r in read_records(f)] for split, paths in files.items()}
    urls = {split: [r["url"] for r in rs] for split, rs in records.items()}
    texts = {split: {r["text"] for r in rs} for split, rs in records.items()}
    assert urls["validation"] and len(urls["train"]) > 20 * len(urls["validation"])
    all_urls = urls["train"] + urls["validation"]
    assert len(set(all_urls)) == len(all_urls)
    assert not texts["train"] & texts["validation"]
    assert all(split_of(url) == "validation" for url in urls["validation"])


def test_rebuild_reuses_the_cache(small_corpus, monkeypatch):
    out_dir, files = small_corpus
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out_dir.iterdir()}

    def no_walk():
        raise AssertionError("the corpus was rebuilt")

    monkeypatch.setattr(corpus, "source_tasks", no_walk)
    assert build_corpus(out_dir, **SMALL) == files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out_dir.iterdir()} == before


def test_incomplete_build_is_rebuilt_identically(small_corpus, tmp_path):
    _, files = small_corpus
    first = build_corpus(tmp_path, **SMALL)
    (tmp_path / corpus.MANIFEST).unlink()
    Path(first["train"][0]).write_bytes(b"truncated")
    assert build_corpus(tmp_path, **SMALL) == first
    # Same environment, same corpus: byte-identical to the module's build.
    for split in files:
        assert [Path(f).read_bytes() for f in first[split]] == [
            Path(f).read_bytes() for f in files[split]]


def test_other_shard_count_rebuilds_and_removes_stale_shards(tmp_path):
    build_corpus(tmp_path, **SMALL)
    files = build_corpus(tmp_path, **{**SMALL, "n_train_shards": 3})
    assert len(files["train"]) == 3
    assert sorted(p.name for p in tmp_path.glob("c4-*.json.gz")) == sorted(
        Path(f).name for f in files["train"] + files["validation"])


def test_too_small_a_cap_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="too few"):
        build_corpus(tmp_path, max_bytes=1000)
    assert not (tmp_path / corpus.MANIFEST).exists()


def test_datasets_streams_the_shards(small_corpus):
    _, files = small_corpus
    streams = load_dataset("json", data_files=files, streaming=True)
    for split, paths in files.items():
        rows = list(streams[split])
        assert [row["text"] for row in rows] == list(iter_texts(paths))
        assert set(rows[0]) == {"text", "timestamp", "url"}


def test_docstrings_have_qualnames():
    source = ('"""Module."""\nclass A:\n    """Class."""\n    def f(self):\n'
              '        """Method."""\ndef g():\n    pass\n')
    assert docstrings(source) == [("", "Module."), ("A", "Class."), ("A.f", "Method.")]
    assert docstrings('"""Syntax error."""\ndef (:') == []
    assert docstrings('"""Mostly code."""\n' + "x = 1\n" * 100) == []


def test_is_prose_keeps_text_and_drops_code():
    text = "The optimizer keeps a running average of squared gradients for each parameter. " * 4
    code = "x = torch.zeros((4, 8)); y = x[:, 1:3] @ w.T + b  # (4, 2)\n" * 6
    assert is_prose(text)
    assert not is_prose(code)
    assert not is_prose(text[:100])


def test_validation_share_is_small():
    share = sum(split_of(f"file://x/{i}.py#f") == "validation" for i in range(20000)) / 20000
    assert 0.01 < share < 0.02


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_OPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LM_OPT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lm_opt"
