"""Streaming C4 (or a local corpus in C4's format), tokenized and packed into fixed windows.

Documents are tokenized in batches, joined with EOS and cut into windows of `seq_len + 1`
tokens (inputs and shifted targets) with no padding: a document that crosses a window
boundary continues in the next window, so no token is lost or repeated. Each DDP rank and
DataLoader worker reads a disjoint part of the stream, and the position of every part is
saved in the checkpoint, so a resumed run continues with the next unseen window. A position
names a document batch and a token count, not the leftover tokens themselves: batches carry a
few integers and a small dataset state through the loader, and resuming re-reads at most one
batch of documents.
"""

import json
import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from datasets import IterableDataset as HFIterableDataset
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset

from lm_opt.corpus import MANIFEST, build_corpus, default_cache_dir
from lm_opt.data_order import epoch_batches
from lm_opt.errors import UserError
from lm_opt.tokenizer import load_tokenizer

log = logging.getLogger("lm_opt")

EMBEDDED = "embedded"
STATE_KEY = "stream_state"


class Packer:
    """A token buffer that emits fixed windows.

    It counts the tokens it has emitted (popped, or skipped on resume), so a position in the
    token stream is a number rather than the buffered tokens.
    """

    def __init__(self, skip: int = 0):
        self.buffer = np.empty(0, dtype=np.int64)
        self.emitted = 0
        self.to_skip = skip

    @property
    def read(self) -> int:
        """Tokens added so far, skipped ones included."""
        return self.emitted + len(self.buffer)

    def add(self, token_lists: list[list[int]], eos_id: int) -> None:
        pieces = [self.buffer]
        for tokens in token_lists:
            pieces.append(np.asarray(tokens, dtype=np.int64))
            pieces.append(np.asarray([eos_id], dtype=np.int64))
        self.buffer = np.concatenate(pieces)
        skip = min(self.to_skip, len(self.buffer))
        self.buffer, self.to_skip, self.emitted = self.buffer[skip:], self.to_skip - skip, self.emitted + skip

    def pop(self, n_windows: int, window: int) -> np.ndarray | None:
        """The next `n_windows` windows of `window` tokens as an (n_windows, window) array, or None."""
        need = n_windows * window
        if len(self.buffer) < need:
            return None
        out, self.buffer = self.buffer[:need].reshape(n_windows, window), self.buffer[need:]
        self.emitted += need
        return out


class DocumentMarks:
    """Where the buffered tokens came from: for each document batch still (partly) in a Packer,
    its position in the stream (its epoch and where in the epoch it starts, lm_opt.data_order) and
    the index of its first token in the Packer's count."""

    def __init__(self):
        self.marks: deque[tuple[dict, int]] = deque()

    def add(self, where: dict, first_token: int) -> None:
        self.marks.append((where, first_token))

    def position(self, next_token: int) -> dict:
        """Where re-reading resumes the stream at `next_token`: the last document batch that
        starts at or before it, and how many of that batch's tokens to skip."""
        while len(self.marks) > 1 and self.marks[1][1] <= next_token:
            self.marks.popleft()
        where, first_token = self.marks[0]
        return {**where, "skip": next_token - first_token}


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class PackedStream(IterableDataset):
    """Batches of packed windows from one rank's share of a streamed document dataset.

    Yields `{"input_ids": int32 (batch_size, seq_len + 1), "stream_state": ...}`. The DataLoader
    workers split the rank's share again, each reading every `num_parts`-th part of the
    stream (`split_dataset_by_node` over rank x worker), and tag each batch with the position
    of their part after it (`DocumentMarks.position`), so the loader can save exactly what has
    been consumed.
    """

    def __init__(self, docs: HFIterableDataset, tokenizer, seq_len: int, batch_size: int, rank: int,
                 world_size: int, tokenize_batch: int = 64, reshuffle_window: int = 8192,
                 documents: int | None = None):
        self.docs, self.tokenizer = docs, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.tokenize_batch = tokenize_batch
        self.reshuffle_window, self.documents = reshuffle_window, documents
        self.part_states: dict[int, dict] = {}
        self.first_part = 0

    def part_stream(self, part: int, num_parts: int) -> Iterator[dict[str, Any]]:
        """Endless batches from part `part` of `num_parts` of this rank's documents."""
        docs = split_dataset_by_node(self.docs, rank=self.rank * num_parts + part,
                                     world_size=self.world_size * num_parts)
        start = {"epoch": 0, "skip": 0, "tokens": 0, "epoch_tokens": None, **self.part_states.get(part, {})}
        packer, marks = Packer(skip=start["skip"]), DocumentMarks()
        epoch, tokens, epoch_tokens = start["epoch"], start["tokens"], start["epoch_tokens"]
        limit = None if self.documents is None else -(-self.documents // (self.world_size * num_parts))
        eos = self.tokenizer.eos_token_id
        while True:
            empty = True
            for where, texts in epoch_batches(docs, epoch, start, self.tokenize_batch, self.reshuffle_window, limit):
                empty = False
                # `tokens`: the epoch's tokens before this batch; `epoch_tokens`: a whole epoch's, once known
                marks.add({"epoch": epoch, **where, "tokens": tokens, "epoch_tokens": epoch_tokens}, packer.read)
                before = packer.read
                packer.add(tokenize(self.tokenizer, texts), eos)
                tokens += packer.read - before
                while (windows := packer.pop(self.batch_size, self.seq_len + 1)) is not None:
                    yield {"input_ids": torch.from_numpy(windows.astype(np.int32)),
                           STATE_KEY: {"part": part, "state": marks.position(packer.emitted)}}
            if empty:  # a resumed epoch holds at least the batch its position names
                raise RuntimeError(f"data part {part} of rank {self.rank} holds no documents")
            epoch, start, tokens, epoch_tokens = epoch + 1, {}, 0, tokens

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker i serves part (first_part + i): after a resume the DataLoader starts at worker
        # 0 again, and the rotation makes the part that was next come first.
        yield from self.part_stream((self.first_part + worker) % num_workers, num_workers)


def leave_signals_to_main(worker_id: int) -> None:
    """Workers ignore the signals that pre-empt a run: a scheduler signals every process of a job,
    and the main process ends the run after the step in progress, with a checkpoint of it
    (lm_opt.callbacks.preemption). A worker killed by the signal would end the run at once, as
    failed. Workers still exit with the main process (torch's watchdog), and `end_data_workers`
    ends them where the main process lives on."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def end_data_workers() -> None:
    """Kill this process's DataLoader workers once `fit` has returned or raised. A run that ends
    normally has shut them down already; one whose failure handling failed too (a log folder gone,
    a callback raising in `on_exception`) skips Lightning's teardown and leaves them running, and at
    interpreter exit multiprocessing would stop them with SIGTERM, which they ignore, and wait on them
    forever."""
    alive = [w for w in ResumableLoader.workers if w.is_alive()]
    if alive:  # torch's SIGCHLD handler would raise over the run's own error on seeing them killed
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
        worker.join(timeout=10)
    ResumableLoader.workers.clear()


class ResumableLoader(DataLoader):
    """A DataLoader over a PackedStream whose `state_dict` is the stream position of what was
    trained on. Lightning saves and restores it with the fit loop (the `_Stateful` protocol)."""

    workers: list = []
    """The worker processes its iterators started in this process, for `end_data_workers` (an
    iterator that is gone may leave its workers running: torch stops them with SIGTERM)."""

    def __init__(self, stream: PackedStream, num_workers: int, pin_memory: bool = False):
        super().__init__(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=4 if num_workers else None, worker_init_fn=leave_signals_to_main)
        self.stream = stream
        warn_if_shards_do_not_divide(stream.docs.n_shards, stream.world_size, num_workers)

    def _get_iterator(self):
        iterator = super()._get_iterator()
        ResumableLoader.workers[:] = [w for w in ResumableLoader.workers if w.is_alive()]
        ResumableLoader.workers += getattr(iterator, "_workers", [])
        return iterator

    def commit(self, stream_state: dict) -> None:
        """Record that the batch tagged with `stream_state` has been trained on."""
        part = stream_state["part"]
        self.stream.part_states[part] = stream_state["state"]
        self.stream.first_part = (part + 1) % max(self.num_workers, 1)

    def epochs(self) -> float | None:
        """Passes over the training data so far, e.g. 2.25 for two whole passes and a quarter of the
        third (the mean over this rank's parts); None before the first pass has ended, when the size
        of a pass is not yet known."""
        passes = [state["epoch"] + (state["tokens"] + state["skip"]) / state["epoch_tokens"]
                  for state in self.stream.part_states.values() if state.get("epoch_tokens")]
        if not passes or len(passes) < len(self.stream.part_states):
            return None
        return sum(passes) / len(passes)

    def state_dict(self) -> dict:
        local = {"part_states": self.stream.part_states, "first_part": self.stream.first_part,
                 "num_workers": self.num_workers}
        # Only rank 0 writes the checkpoint, but every rank has its own position.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        else:
            ranks = [local]
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict["ranks"]
        if len(ranks) != self.stream.world_size:
            raise UserError(f"checkpoint data position is for {len(ranks)} ranks, this run has "
                            f"{self.stream.world_size}: resume with the same number of devices")
        local = ranks[self.stream.rank]
        if local["num_workers"] != self.num_workers:
            raise UserError(f"checkpoint data position is for data.num_workers={local['num_workers']}, "
                            f"this run has {self.num_workers}: resume with the same value")
        if any("skip" not in v for v in local["part_states"].values()):
            raise UserError("checkpoint data position holds leftover tokens (saved before positions became "
                            "document batch + token count): resume it with the lm_opt that wrote it")
        self.stream.part_states = {int(k): v for k, v in local["part_states"].items()}
        self.stream.first_part = local["first_part"]


def warn_if_shards_do_not_divide(n_shards: int, world_size: int, num_workers: int) -> None:
    """Warn when the shards do not divide over ranks x workers: `split_dataset_by_node` then
    has every part read all the shards and keep every `parts`-th document, so each part
    decompresses and parses the whole dataset (C4's 1024 train shards need a power of two)."""
    workers = max(num_workers, 1)
    if n_shards % (world_size * workers) == 0:
        return
    fits = [w for w in range(workers, 0, -1) if n_shards % (world_size * w) == 0]
    fix = (f"set data.num_workers: {fits[0]}" if fits else
           f"no worker count fixes this on {world_size} ranks: use a device count that divides {n_shards}")
    log.warning("data: %d train shards do not divide over %d ranks x %d workers = %d parts, so every part "
                "reads all %d shards and skips the other parts' documents; %s",
                n_shards, world_size, workers, world_size * workers, n_shards, fix)


def validation_windows(docs: HFIterableDataset, tokenizer, seq_len: int, n_windows: int) -> torch.Tensor:
    """The first `n_windows` packed windows of the validation stream: a fixed, deterministic set."""
    packer = Packer()
    for batch in docs.iter(batch_size=64):
        packer.add(tokenize(tokenizer, batch["text"]), tokenizer.eos_token_id)
        if len(packer.buffer) >= n_windows * (seq_len + 1):
            break
    windows = packer.pop(n_windows, seq_len + 1)
    if windows is None:
        raise UserError(f"the validation split holds fewer than data.val_sequences={n_windows} windows "
                        f"of {seq_len + 1} tokens; lower data.val_sequences")
    return torch.from_numpy(windows.astype(np.int32))


def validation_array(docs: HFIterableDataset, tokenizer, seq_len: int, n_windows: int) -> np.ndarray:
    """`validation_windows` as a numpy array, which a child process returns by plain pickling."""
    return validation_windows(docs, tokenizer, seq_len, n_windows).numpy()


def local_data_files(path: str) -> dict[str, list[str]]:
    """Train and validation shards of a local directory in C4's layout (`*train*.json.gz`, ...)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"data.path={path!r} is neither 'embedded', a Hub dataset id, nor a directory")
    files = {split: sorted(str(p) for p in root.glob(f"*{split}*.json*")) for split in ("train", "validation")}
    for split, found in files.items():
        if not found:
            raise UserError(f"data.path={path!r} holds no '*{split}*.json*' shards (C4 layout expected)")
    return files


class C4DataModule(L.LightningDataModule):
    """C4 streamed from the Hub (`path: allenai/c4`), or a local corpus in C4's format
    (`path: embedded` builds one offline; any directory of json.gz shards works), through the
    same code: `load_dataset(..., streaming=True)`, batched fast tokenization, packing."""

    def __init__(
        self,
        path: str = "allenai/c4",
        name: str | None = "en",
        tokenizer: str = "t5-base",
        embedded_vocab: int = 32000,
        seq_len: int = 512,
        batch_size: int = 32,
        num_workers: int = 2,
        val_sequences: int = 512,
        tokenize_batch: int = 64,
        reshuffle_window: int = 8192,
        train_documents: int | None = None,
        cache_dir: str | None = None,
    ):
        """
        Args:
            path: `allenai/c4` (or another Hub dataset id), `embedded`, or a directory of C4-style shards.
            name: The Hub dataset's configuration (`en` for C4); ignored for local data.
            tokenizer: `t5-base` (or any Hub id or local directory), or `embedded` (trained offline).
            embedded_vocab: Sentencepiece pieces of the `embedded` tokenizer, before T5's 100 extra
                ids: 32000 as T5; 8000 for CPU-scale models (the `cpu` and `tiny` presets).
            seq_len: Tokens per training sequence; each window holds seq_len + 1 tokens.
            batch_size: Sequences per device and step (the global batch also counts devices and
                gradient accumulation).
            num_workers: DataLoader workers tokenizing and packing in parallel, per device.
            val_sequences: Size of the fixed validation set, in sequences, shared by all ranks.
            tokenize_batch: Documents tokenized per call of the fast tokenizer.
            reshuffle_window: Documents permuted together in every epoch after the first
                (lm_opt.data_order); 8192 holds the whole embedded corpus (6,491 documents).
            train_documents: Train on the first N documents of the train split only, repeated each
                epoch (each rank x worker part reads its share); None: the whole split.
            cache_dir: Where the embedded corpus and tokenizer are built (default `~/.cache/lm_opt`).
        """
        super().__init__()
        if train_documents is not None and train_documents < 1:
            raise UserError(f"data.train_documents must be a positive integer or null, got {train_documents}")
        for key in ("embedded_vocab", "seq_len", "batch_size", "val_sequences", "tokenize_batch", "reshuffle_window"):
            if locals()[key] < 1:
                raise UserError(f"data.{key} must be a positive integer, got {locals()[key]}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer = None
        self.stream: PackedStream | None = None
        self.train_loader: ResumableLoader | None = None

    def tokens_per_step(self, trainer: L.Trainer) -> int:
        """Tokens one optimizer step trains on, over all devices and accumulated micro-batches."""
        return (self.hparams.batch_size * self.hparams.seq_len * trainer.world_size
                * trainer.accumulate_grad_batches)

    def load_documents(self) -> dict[str, HFIterableDataset]:
        """The train and validation document streams, local or from the Hub, before tokenization."""
        path = self.hparams.path
        if path == EMBEDDED or Path(path).is_dir():
            files = build_corpus(self.cache_dir / "corpus") if path == EMBEDDED else local_data_files(path)
            return load_dataset("json", data_files=files, streaming=True)
        try:
            return load_dataset(path, self.hparams.name, streaming=True)
        except Exception as err:  # the Hub raises several types when offline or unreachable
            raise UserError(
                f"cannot stream data.path={path!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
                "Offline, use `data.path: embedded` (a local corpus built from installed documentation) "
                "or a directory of C4-style json.gz shards."
            ) from err

    def _load_tokenizer(self):
        name = self.hparams.tokenizer
        if name == EMBEDDED:
            return load_tokenizer(name, pieces=self.hparams.embedded_vocab,
                                  corpus_files=build_corpus(self.cache_dir / "corpus")["train"],
                                  cache_dir=self.cache_dir)
        try:
            return load_tokenizer(name, cache_dir=self.cache_dir)
        except RuntimeError as err:  # a directory without tokenizer files, an unreachable Hub id, ...
            raise UserError(f"data.tokenizer={name!r}: {err}") from err

    def prepare_data(self) -> None:
        # Rank 0 builds the embedded corpus and tokenizer once; the other ranks reuse the cache,
        # and rank 0 keeps its tokenizer, so setup does not load (and log) it a second time.
        if self.hparams.path == EMBEDDED or self.hparams.tokenizer == EMBEDDED:
            self.tokenizer = self._load_tokenizer()

    def identity(self) -> dict[str, Any]:
        """What the run reads, for its record: data and tokenizer as configured, the Hub
        configuration, and the content hash of a local corpus's manifest where it has one."""
        path = self.hparams.path
        corpus = self.cache_dir / "corpus" if path == EMBEDDED else Path(path)
        try:
            sha256 = json.loads((corpus / MANIFEST).read_text()).get("sha256")
        except (OSError, ValueError):
            sha256 = None
        hub = not (path == EMBEDDED or corpus.is_dir())
        return {"path": path, "hub_dataset": path if hub else None, "name": self.hparams.name if hub else None,
                "tokenizer": self.hparams.tokenizer, "corpus_sha256": sha256,
                "embedded_vocab": self.hparams.embedded_vocab if self.hparams.tokenizer == EMBEDDED else None}

    def setup(self, stage: str) -> None:
        if self.stream is not None:
            return
        if self.tokenizer is None:  # prepare_data ran on another rank, or not at all
            self.tokenizer = self._load_tokenizer()
        self.docs = self.load_documents()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        log.info("data: %s, tokenizer: %s (%d tokens, eos=%d)", self.hparams.path,
                 self.hparams.tokenizer, len(self.tokenizer), self.tokenizer.eos_token_id)
        # Once a fast tokenizer has encoded on several threads, tokenizers turns its threads off
        # in every process forked afterwards, and the DataLoader workers are forked later: this
        # process must not encode, so a child encodes the validation windows.
        with multiprocessing.Pool(1) as pool:
            windows = torch.from_numpy(pool.apply(validation_array, (
                self.docs["validation"], self.tokenizer, self.hparams.seq_len, self.hparams.val_sequences)))
        self.val_windows = windows[rank::world]
        self.stream = PackedStream(self.docs["train"], self.tokenizer, self.hparams.seq_len,
                                   self.hparams.batch_size, rank, world, self.hparams.tokenize_batch,
                                   self.hparams.reshuffle_window, self.hparams.train_documents)

    def train_dataloader(self) -> ResumableLoader:
        self.train_loader = ResumableLoader(self.stream, self.hparams.num_workers,
                                            pin_memory=torch.cuda.is_available())
        return self.train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.val_windows], batch_size=self.hparams.batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called for the batch about to be trained on, after Lightning's one-batch prefetch:
        # committing here saves the position of what was trained on, not of what was fetched.
        state = batch.pop(STATE_KEY, None)
        if state is not None and self.train_loader is not None:
            self.train_loader.commit(state)
        return batch
