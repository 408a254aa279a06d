import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lm_opt.corpus import default_cache_dir, iter_texts
from lm_opt.tokenizer import (SPIECE, SPIECE_SHA256, load_tokenizer, train_t5_like_tokenizer,
                              vocabulary_sha256)

SENTENCE = "The optimizer keeps a running average of the gradients for each parameter."


@pytest.fixture(scope="module")
def corpus_files(embedded_corpus) -> dict[str, list[str]]:
    return embedded_corpus


@pytest.fixture(scope="module")
def small_dir(corpus_files, tmp_path_factory) -> Path:
    return train_t5_like_tokenizer(iter_texts(corpus_files["train"]),
                                   tmp_path_factory.mktemp("tok") / "small", vocab_size=2000, sample_bytes=2_000_000)


def test_every_machine_trains_the_pinned_8000_piece_tokenizer(caplog):
    """The CPU study's tokenizer, from the pinned corpus (in this machine's cache, trained if absent)."""
    with caplog.at_level(logging.INFO, logger="lm_opt"):
        tokenizer = load_tokenizer("embedded", pieces=8000)
    assert "8100 tokens, eos id 1" in caplog.text
    assert_t5_layout(tokenizer, 8000)
    out_dir = default_cache_dir() / "tokenizer-8000"
    assert vocabulary_sha256(out_dir / SPIECE) == SPIECE_SHA256[8000]


def assert_t5_layout(tokenizer, vocab_size: int) -> None:
    assert tokenizer.is_fast
    assert len(tokenizer) == vocab_size + 100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == vocab_size + 99
    assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == vocab_size


@pytest.mark.slow
def test_small_tokenizer_has_t5_layout_and_round_trips(small_dir, corpus_files, caplog):
    with caplog.at_level(logging.INFO, logger="lm_opt"):
        tokenizer = load_tokenizer(str(small_dir))
    assert "2100 tokens, eos id 1" in caplog.text
    assert_t5_layout(tokenizer, 2000)
    ids = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and max(ids) < 2000
    assert tokenizer.decode(ids) == SENTENCE
    # Batched calls on whole documents, as the data module makes them.
    docs = list(iter_texts(corpus_files["validation"]))[:8]
    batch = tokenizer(docs, add_special_tokens=False)["input_ids"]
    one_by_one = [tokenizer(doc, add_special_tokens=False)["input_ids"] for doc in docs]
    assert batch == one_by_one


@pytest.mark.slow
def test_trained_directory_is_reused(small_dir):
    mtime = (small_dir / SPIECE).stat().st_mtime_ns

    def no_texts():
        raise AssertionError("the tokenizer was trained again")
        yield

    assert train_t5_like_tokenizer(no_texts(), small_dir, vocab_size=2000) == small_dir
    assert (small_dir / SPIECE).stat().st_mtime_ns == mtime
    assert [p.name for p in small_dir.parent.iterdir() if p.is_dir()] == [small_dir.name]  # no temp dirs left


def test_too_little_text_is_a_clear_error(corpus_files, tmp_path):
    with pytest.raises(RuntimeError, match="training a 32000-piece tokenizer failed"):
        train_t5_like_tokenizer(iter_texts(corpus_files["validation"]), tmp_path / "tok")
    assert [p.name for p in tmp_path.iterdir()] == [".tok.lock"]  # the build lock, nothing half-trained


@pytest.mark.slow
def test_bare_spiece_model_directory_loads_with_t5_layout(small_dir, tmp_path):
    shutil.copy(small_dir / SPIECE, tmp_path / SPIECE)
    assert_t5_layout(load_tokenizer(str(tmp_path)), 2000)


def test_directory_without_tokenizer_files_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="holds no tokenizer files") as err:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.slow
def test_offline_hub_id_raises_a_clear_error(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported.
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = "from lm_opt.tokenizer import load_tokenizer; load_tokenizer('t5-base')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("RuntimeError: cannot load tokenizer 't5-base'")
    assert "data.tokenizer: embedded" in message


@pytest.mark.slow
def test_embedded_tokenizer_has_t5_layout_at_full_size(corpus_files, tmp_path, caplog):
    """Trains T5's 32000 pieces (about 40 s): the study presets' vocabulary size."""
    with caplog.at_level(logging.INFO, logger="lm_opt"):
        tokenizer = load_tokenizer("embedded", corpus_files=corpus_files["train"], cache_dir=tmp_path)
    assert "32100 tokens, eos id 1" in caplog.text
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert_t5_layout(tokenizer, 32000)
    ids = tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == SENTENCE
    assert (tmp_path / "tokenizer-32000" / SPIECE).is_file()
    text = "Returns {'loss': x!} and [a, b] for f(x) = 2 * x ** 2 - 1; see `step()` <note> @ 100%."
    assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]
