"""The baseline every run must beat: the unigram cross-entropy of its validation set.

A model that ignores context and predicts each token's frequency in the training split scores
`-mean(log p(x))` over the validation targets, with `p` the add-half smoothed unigram
distribution (every token of the vocabulary gets half a count, so none has probability 0).
A language model that does not end clearly below it has learned token frequencies, not language.
"""

import hashlib
import io

import numpy as np
import torch

from lm_opt.corpus import atomic_write, corpus_sha256
from lm_opt.data import EMBEDDED, C4DataModule, tokenize, validation_windows

SMOOTHING = 0.5


def unigram_counts(tokenizer, texts, vocab_size: int, batch: int = 256) -> np.ndarray:
    """Token counts of `texts`, each document followed by EOS as the data module packs it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk: list[str] = []
    for text in [*texts, None]:
        if text is not None:
            chunk.append(text)
        if chunk and (text is None or len(chunk) == batch):
            ids = np.concatenate([np.asarray(t + [tokenizer.eos_token_id]) for t in tokenize(tokenizer, chunk)])
            counts += np.bincount(ids, minlength=vocab_size)
            chunk = []
    return counts


def unigram_cross_entropy(counts: np.ndarray, targets: torch.Tensor) -> float:
    """Mean `-log p(target)` in nats under the smoothed unigram distribution of `counts`."""
    probs = (counts + SMOOTHING) / (counts.sum() + SMOOTHING * len(counts))
    return float(-np.log(probs[targets.flatten().long().numpy()]).mean())


def data_baseline(data: dict) -> dict:
    """The unigram baseline of a run's data config (the `data` section of its config.yaml):
    counts from the whole training split, scored on the run's fixed validation windows."""
    dm = C4DataModule(**data)
    tokenizer = dm._load_tokenizer()
    docs = dm.load_documents()
    counts = training_counts(dm, tokenizer, docs)
    windows = validation_windows(docs["validation"], tokenizer, dm.hparams.seq_len, dm.hparams.val_sequences)
    return {"unigram_val_loss": unigram_cross_entropy(counts, windows[:, 1:]),
            "train_tokens": int(counts.sum()), "val_targets": int(windows[:, 1:].numel()),
            "vocab_size": len(tokenizer), "smoothing": SMOOTHING}


def training_counts(dm: C4DataModule, tokenizer, docs) -> np.ndarray:
    """unigram_counts of the training split. For the embedded corpus and tokenizer, cached beside
    them under a hash of both (the same bytes on every machine): tokenizing the split takes
    seconds, and every report and card asks for it."""
    path = None
    if dm.hparams.path == EMBEDDED and dm.hparams.tokenizer == EMBEDDED:
        model = dm.cache_dir / f"tokenizer-{dm.hparams.embedded_vocab}" / "spiece.model"
        key = hashlib.sha256(str(corpus_sha256(dm.cache_dir / "corpus")).encode() + model.read_bytes()).hexdigest()
        path = dm.cache_dir / f"unigram-{key[:16]}.npy"
        if path.is_file():
            return np.load(path)
    counts = unigram_counts(tokenizer, (d["text"] for d in docs["train"]), len(tokenizer))
    if path is not None:
        buffer = io.BytesIO()
        np.save(buffer, counts)
        atomic_write(path, buffer.getvalue())
    return counts
