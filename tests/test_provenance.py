"""What summary.json records about what produced a run: commit, dirty tree, data identity."""

import json
import subprocess

from lm_opt import provenance
from lm_opt.data import C4DataModule


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_the_commit_and_a_dirty_tree_are_recorded_and_none_outside_a_checkout(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "model.py").write_text("a = 1\n")
    git(repo, "add", "model.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(provenance, "REPO", repo.resolve())
    (repo / "notes.txt").write_text("untracked files leave the tree clean\n")
    assert provenance.code_version() == {"commit": head, "dirty": False}
    (repo / "model.py").write_text("a = 2\n")
    assert provenance.code_version() == {"commit": head, "dirty": True}
    # A package folder inside another project's checkout is not a checkout of lm_opt.
    (repo / "site-packages").mkdir()
    monkeypatch.setattr(provenance, "REPO", (repo / "site-packages").resolve())
    assert provenance.code_version() == {"commit": None, "dirty": None}


def test_data_identity_reads_the_corpus_hash_or_names_the_hub_dataset(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"sha256": "ab12"}))
    local = C4DataModule(path=str(tmp_path), tokenizer="t5-base").identity()
    assert local == {"path": str(tmp_path), "hub_dataset": None, "name": None, "tokenizer": "t5-base",
                     "corpus_sha256": "ab12", "embedded_vocab": None}
    embedded = C4DataModule(path="embedded", tokenizer="embedded", embedded_vocab=8000,
                            cache_dir=str(tmp_path / "cache")).identity()
    assert embedded["corpus_sha256"] is None and embedded["hub_dataset"] is None
    assert embedded["embedded_vocab"] == 8000
    hub = C4DataModule(path="allenai/c4", name="en").identity()
    assert hub["hub_dataset"] == "allenai/c4" and hub["name"] == "en" and hub["corpus_sha256"] is None
