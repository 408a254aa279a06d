"""A local corpus in C4's format, built from the English prose that ships with Python packages.

Real C4 needs the Hugging Face Hub. To run offline on the same code path, this module writes
gzip JSON-lines shards with C4's file names and schema (`text`, `timestamp`, `url`), taken from
the docstrings of the standard library and site-packages and from the READMEs inside
`*.dist-info/METADATA`. Nothing third-party is stored in the repository: the corpus is generated
on each machine, deterministically for one environment (sorted file walk), and cached. Shards are
written atomically and a manifest written last marks the build complete, so an interrupted build
is never reused.
"""

import ast
import contextlib
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

log = logging.getLogger("lm_opt")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
# C4's timestamp format; one fixed value keeps rebuilds byte-identical.
TIMESTAMP = "2019-04-25T00:00:00Z"
MIN_CHARS = 200
# Share of ASCII letters and whitespace: keeps prose, drops code, tables and non-English text.
MIN_PROSE = 0.8
# Documents whose url hashes below this (out of 1000) go to validation: about 1.5%.
VAL_PER_MILLE = 15
# Parsing is the costly part. Files whose triple-quoted strings are under this share of the
# source (code-heavy or generated) take half the parse time for a tenth of the docstring text.
MIN_QUOTED = 0.15
SKIP_DIRS = {"__pycache__", "site-packages", "test", "tests"}
MAX_WORKERS = 8
_NOT_PROSE = re.compile(r"[^A-Za-z\s]")
_TRIPLE_QUOTED = re.compile(r'""".*?"""|' + r"'''.*?'''", re.DOTALL)
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

Task = tuple[str, str, str]  # (url label, root directory, path relative to the root)


def default_cache_dir() -> Path:
    """Where built corpora and tokenizers are kept: `$LM_OPT_CACHE`, else `~/.cache/lm_opt`."""
    return Path(os.environ.get("LM_OPT_CACHE") or Path.home() / ".cache" / "lm_opt").expanduser()


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
    if sum(map(len, _TRIPLE_QUOTED.findall(source))) < MIN_QUOTED * len(source):
        return []
    try:
        with warnings.catch_warnings():  # invalid escapes in third-party code warn on every parse
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    found = [("", ast.get_docstring(tree)), *_definitions(tree.body, "")]
    return [(name, doc) for name, doc in found if doc]


def readme(metadata: str) -> list[tuple[str, str]]:
    """The long description of a `METADATA` file: the message body after its headers."""
    return [("", metadata.partition("\n\n")[2].strip())]


def extract(task: Task) -> list[tuple[str, str]]:
    """The `(url, text)` prose documents of one source file; none if it cannot be read."""
    label, root, rel = task
    try:
        content = (Path(root) / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found = readme(content) if rel.endswith("METADATA") else docstrings(content)
    base = f"file://{label}/{rel}"
    return [(f"{base}#{name}" if name else base, text) for name, text in found if is_prose(text)]


def source_tasks() -> list[Task]:
    """Package READMEs, then Python files of the standard library and site-packages, sorted."""
    paths = sysconfig.get_paths()
    site = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    tasks = [("site-packages", str(root), str(meta.relative_to(root)))
             for root in site for meta in sorted(root.glob("*.dist-info/METADATA"))]
    for label, root in [("stdlib", Path(paths["stdlib"]))] + [("site-packages", r) for r in site]:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            rel = Path(folder).relative_to(root)
            tasks += [(label, str(root), str(rel / f)) for f in sorted(files) if f.endswith(".py")]
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
    with multiprocessing.Pool(workers) as pool:  # terminated on exit, e.g. once the cap is reached
        yield lambda func, items: pool.imap(func, items, chunksize=16)


def split_of(url: str) -> str:
    """Validation or train, by a hash of the url: stable across builds, environments and caps."""
    bucket = int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % 1000
    return "validation" if bucket < VAL_PER_MILLE else "train"


def collect(found: Iterable[list[tuple[str, str]]], max_bytes: int) -> dict[str, list[dict]]:
    """C4 records from the found documents, without repeated texts or urls, up to `max_bytes`."""
    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    seen_texts, seen_urls, total = set(), set(), 0
    for docs in found:
        for url, text in docs:
            data = text.encode("utf-8")
            digest = hashlib.sha1(data).digest()
            if digest in seen_texts or url in seen_urls:
                continue
            if total + len(data) > max_bytes:
                return records
            seen_texts.add(digest)
            seen_urls.add(url)
            total += len(data)
            records[split_of(url)].append({"text": text, "timestamp": TIMESTAMP, "url": url})
    return records


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
    """Deal the records round-robin into `n_shards` C4-named gzip JSON-lines files."""
    if len(records) < n_shards:
        raise RuntimeError(f"the embedded corpus has {len(records)} {split} documents, too few for "
                           f"{n_shards} shards: raise max_bytes or lower the number of shards")
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


def build_corpus(out_dir: Path, *, max_bytes: int = 24_000_000, n_train_shards: int = 8,
                 n_val_shards: int = 1) -> dict[str, list[str]]:
    """Build (or reuse) the embedded corpus in `out_dir`.

    Returns:
        `{"train": [paths], "validation": [paths]}` of C4-style `json.gz` shards, ready for
        `datasets.load_dataset("json", data_files=..., streaming=True)`.
    """
    out_dir = Path(out_dir).resolve()
    config = {"format": FORMAT_VERSION, "max_bytes": max_bytes, "n_train_shards": n_train_shards,
              "n_val_shards": n_val_shards}
    if (files := cached_files(out_dir, config)) is not None:
        return files
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    with ordered_map(min(usable_cpus(), MAX_WORKERS)) as map_:
        records = collect(map_(extract, source_tasks()), max_bytes)
    shards = {"train": n_train_shards, "validation": n_val_shards}
    names = {split: write_shards(records[split], out_dir, split, shards[split]) for split in SPLITS}
    sizes = {split: sum(len(r["text"].encode("utf-8")) for r in records[split]) for split in SPLITS}
    manifest = {"config": config, "files": names, "bytes": sizes,
                "documents": {split: len(records[split]) for split in SPLITS}}
    atomic_write(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    current = {name for split in SPLITS for name in names[split]}
    for stale in out_dir.glob("c4-*.json.gz"):  # from an earlier build with other shard counts
        if stale.name not in current:
            stale.unlink()
    log.info("embedded corpus: %d train documents (%.1f MB), %d validation (%.2f MB) in %s, "
             "built in %.0f s", len(records["train"]), sizes["train"] / 1e6, len(records["validation"]),
             sizes["validation"] / 1e6, out_dir, time.perf_counter() - start)
    return {split: [str(out_dir / n) for n in names[split]] for split in SPLITS}


def iter_texts(files: Iterable[str]) -> Iterator[str]:
    """The `text` field of each record of C4-style `json.gz` shards, in order."""
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
