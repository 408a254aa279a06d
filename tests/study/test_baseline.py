import math
from types import SimpleNamespace

import numpy as np
import torch

from lm_opt.study import baseline
from lm_opt.study.baseline import training_counts, unigram_counts, unigram_cross_entropy


class WordTokenizer:
    """Whitespace words as ids, EOS = 1: enough of a fast tokenizer for counting."""

    eos_token_id = 1
    vocab = {"a": 2, "b": 3, "c": 4}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab[w] for w in t.split()] for t in texts]}

    def __len__(self):
        return 6


def test_counts_include_one_eos_per_document_as_packed():
    counts = unigram_counts(WordTokenizer(), ["a a b", "a c"], vocab_size=6, batch=1)
    assert counts.tolist() == [0, 2, 3, 1, 1, 0]


def test_cross_entropy_is_the_mean_negative_log_of_smoothed_frequencies():
    counts = np.array([0, 2, 3, 1, 1, 0])  # 7 tokens, 6 ids: p = (c + 0.5) / 10
    targets = torch.tensor([[2, 2], [1, 5]])
    expected = -(2 * math.log(0.35) + math.log(0.25) + math.log(0.05)) / 4
    assert math.isclose(unigram_cross_entropy(counts, targets), expected, rel_tol=1e-12)


def test_embedded_counts_are_read_back_from_the_cache_until_the_tokenizer_changes(tmp_path, monkeypatch):
    dm = SimpleNamespace(hparams=SimpleNamespace(path="embedded", tokenizer="embedded", embedded_vocab=8),
                         cache_dir=tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "manifest.json").write_text('{"sha256": "abc"}')
    (tmp_path / "tokenizer-8").mkdir()
    (tmp_path / "tokenizer-8" / "spiece.model").write_bytes(b"one model")
    docs = {"train": [{"text": "a a b"}, {"text": "a c"}]}
    assert training_counts(dm, WordTokenizer(), docs).tolist() == [0, 2, 3, 1, 1, 0]
    counted = []
    monkeypatch.setattr(baseline, "unigram_counts", lambda *args: counted.append(args) or np.zeros(6, dtype=int))
    assert training_counts(dm, WordTokenizer(), docs).tolist() == [0, 2, 3, 1, 1, 0] and not counted
    (tmp_path / "tokenizer-8" / "spiece.model").write_bytes(b"another model")
    assert training_counts(dm, WordTokenizer(), docs).tolist() == [0] * 6 and len(counted) == 1
