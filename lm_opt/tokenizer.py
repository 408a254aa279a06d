"""Tokenizers: T5's from the Hub, a local directory, or one with T5's layout trained offline.

The "embedded" tokenizer is a sentencepiece unigram model with T5's id layout (pad 0, eos 1,
unk 2, no bos, 32000 pieces, then 100 `<extra_id_*>`), so a model sized for `t5-base` fits it
unchanged; CPU-scale runs use fewer pieces (`data.embedded_vocab: 8000`) so that the transformer
body, not the embedding and the output layer, holds most of a small model's compute. It is
trained once on the embedded corpus and cached; training happens in a temporary directory
renamed into place, so an interrupted run is never reused. Training is single-threaded because
sentencepiece's result depends on its thread count; with the pinned corpus and sentencepiece,
every machine gets the same `spiece.model` (`SPIECE_SHA256`, checked by a test).
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5Tokenizer

from lm_opt.corpus import build_corpus, build_lock, default_cache_dir, iter_texts

log = logging.getLogger("lm_opt")

EMBEDDED = "embedded"
SPIECE = "spiece.model"
# Written last into a trained directory: it says the directory is complete, and for which size.
MARKER = "lm_opt_tokenizer.json"
T5_VOCAB_SIZE = 32000
# Enough text for 32000 pieces (6 MB of docstrings is not); training on it takes 10-20 s.
SAMPLE_BYTES = 12_000_000
TOKENIZER_FILES = ("tokenizer.json", SPIECE, "tokenizer.model", "vocab.json", "vocab.txt")
# `vocabulary_sha256` of the trained model per piece count, from the pinned corpus and sentencepiece.
SPIECE_SHA256 = {
    8000: "02c1ccbf01b747e28ca5878ea645cbd100247dfdb823203431c0a8193e1731d3",
}


def sample_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The non-empty lines of `texts`, up to `max_bytes`: sentencepiece's input sentences."""
    total = 0
    for text in texts:
        for line in text.splitlines():
            if line := line.strip():
                total += len(line.encode("utf-8"))
                if total > max_bytes:
                    return
                yield line


def read_marker(out_dir: Path) -> dict:
    """What a trained directory says of itself (`vocab_size`, `sha256`); {} if incomplete."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def is_trained(out_dir: Path, vocab_size: int) -> bool:
    """Whether `out_dir` holds a complete tokenizer trained with `vocab_size` pieces."""
    return read_marker(out_dir).get("vocab_size") == vocab_size and (out_dir / "tokenizer.json").is_file()


def vocabulary_sha256(model_file: Path) -> str:
    """SHA-256 of a sentencepiece model's pieces and scores (its file also holds temporary paths)."""
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    entries = (f"{processor.id_to_piece(i)}\t{processor.get_score(i)!r}\n" for i in range(len(processor)))
    return hashlib.sha256("".join(entries).encode("utf-8")).hexdigest()


def train_spiece(lines: Iterator[str], model_prefix: Path, vocab_size: int) -> None:
    """Train a unigram model with T5's ids: pad 0, eos 1, unk 2, no bos.

    Every character of the sample gets a piece (`character_coverage=1.0`): with the default
    0.9995, characters as common in docstrings as "!" became `<unk>` (0.2% of tokens, not 0.01%).
    """
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(model_prefix), model_type="unigram",
            vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
            num_threads=1, minloglevel=2)
    except RuntimeError as err:  # most often: too little text for `vocab_size` pieces
        raise RuntimeError(f"training a {vocab_size}-piece tokenizer failed: {err}") from err


def publish(tmp: Path, out_dir: Path, vocab_size: int) -> None:
    """Rename the finished `tmp` to `out_dir`, replacing an incomplete or different tokenizer."""
    os.chmod(tmp, 0o755)  # mkdtemp makes directories private; the cache may be shared
    if out_dir.exists() and not is_trained(out_dir, vocab_size):
        shutil.rmtree(out_dir)
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process finished first
        if not is_trained(out_dir, vocab_size):
            raise


def train_t5_like_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = T5_VOCAB_SIZE,
                            sample_bytes: int = SAMPLE_BYTES) -> Path:
    """Train (or reuse) a sentencepiece unigram tokenizer with T5's id layout in `out_dir`.

    The directory gets `spiece.model` and the fast tokenizer's `tokenizer.json` and
    `tokenizer_config.json`, so `AutoTokenizer.from_pretrained(out_dir)` resolves T5's class
    offline without converting the model again.

    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    if is_trained(out_dir, vocab_size):
        return out_dir
    with build_lock(out_dir):
        if not is_trained(out_dir, vocab_size):
            train_into(texts, out_dir, vocab_size, sample_bytes)
    return out_dir


def train_into(texts: Iterable[str], out_dir: Path, vocab_size: int, sample_bytes: int) -> None:
    """Train in a temporary directory beside `out_dir`, then publish it as `out_dir`."""
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        train_spiece(sample_lines(texts, sample_bytes), tmp / "spiece", vocab_size)
        (tmp / "spiece.vocab").unlink()
        # T5Tokenizer adds the 100 extra ids; saving it writes the fast tokenizer's files.
        T5Tokenizer.from_pretrained(tmp).save_pretrained(tmp)
        sha256 = vocabulary_sha256(tmp / SPIECE)
        if vocab_size in SPIECE_SHA256 and sha256 != SPIECE_SHA256[vocab_size]:
            log.warning("embedded tokenizer sha256 %s differs from the pinned %s: results will not "
                        "match the README's", sha256, SPIECE_SHA256[vocab_size])
        (tmp / MARKER).write_text(json.dumps({"vocab_size": vocab_size, "sha256": sha256}))
        publish(tmp, out_dir, vocab_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def from_directory(path: Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved in a local directory; a bare `spiece.model` is read with T5's layout."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise RuntimeError(f"tokenizer directory {path} holds no tokenizer files (one of "
                           f"{', '.join(TOKENIZER_FILES)}): point data.tokenizer to a directory "
                           "saved with save_pretrained, or holding a sentencepiece spiece.model")
    if (path / SPIECE).is_file() and not (path / "tokenizer_config.json").is_file():
        return T5Tokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def from_hub(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer from the Hugging Face Hub or its local cache, with a fix when neither works."""
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # offline, unreachable and missing repos raise several types
        cause = " ".join(f"{type(err).__name__}: {err}".split())
        raise RuntimeError(
            f"cannot load tokenizer {name!r}: it is not in the local Hugging Face cache, and the "
            "Hub is unreachable or HF_HUB_OFFLINE is set. Offline, set `data.tokenizer: embedded` "
            "(T5's layout, trained on the local corpus) or a local directory holding a "
            f"spiece.model. ({cause})"
        ) from err


def load_tokenizer(name: str, *, pieces: int = T5_VOCAB_SIZE, corpus_files: list[str] | None = None,
                   cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The fast tokenizer `name`: "embedded", a local directory, or a Hub id such as "t5-base".

    Args:
        name: What to load; "embedded" trains or reuses one in `cache_dir/tokenizer-<pieces>`.
        pieces: Sentencepiece pieces of the "embedded" tokenizer, before T5's 100 extra ids.
        corpus_files: Text shards to train "embedded" on; by default the embedded corpus's.
        cache_dir: Root of the cache; by default `default_cache_dir()`.
    """
    source = name
    if name == EMBEDDED:
        cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        out_dir = cache_dir / f"tokenizer-{pieces}"
        if not is_trained(out_dir, pieces):
            if corpus_files is None:
                corpus_files = build_corpus(cache_dir / "corpus")["train"]
            train_t5_like_tokenizer(iter_texts(corpus_files), out_dir, pieces)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        source = f"{name} ({out_dir})"
    elif Path(name).is_dir():
        tokenizer = from_directory(Path(name))
    else:
        tokenizer = from_hub(name)
    if not tokenizer.is_fast:  # the slow classes tokenize batches of documents far too slowly
        raise RuntimeError(f"tokenizer {name!r} loaded as the slow {type(tokenizer).__name__}; "
                           "a fast tokenizer (tokenizer.json) is needed")
    log.info("tokenizer: %s, %s, %d tokens, eos id %s", source, type(tokenizer).__name__,
             len(tokenizer), tokenizer.eos_token_id)
    return tokenizer
