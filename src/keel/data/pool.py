"""The stateless work of `keel data prepare` over a process pool: read and parse spans, stages, keys, encoding."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np

from keel.data.drops import dropped_in
from keel.data.minhash import MinHasher
from keel.data.sources import BadRecord
from keel.data.spans import Span, read_span
from keel.data.stages import StageSettings, Verdict, assess, clean
from keel.data.tokenizer import Encoder
from keel.errors import ConfigError
from keel.process import die_with_parent

T, R = TypeVar("T"), TypeVar("R")
TASK_CHARS = 1_000_000  # input per pool task: large enough that pickling is cheap next to the work


def doc_hashes(key: str, ordinal: int) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) for a document: one picks its split, one its sampling."""
    digest = hashlib.blake2b(f"{key}\0{ordinal}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / 2**64, int.from_bytes(digest[8:], "little") / 2**64


class Done(NamedTuple):
    """A worker's result for one document: the scan's verdict, or the write pass's ids (ending in EOS) and PII count."""

    ordinal: int
    split_hash: float
    verdict: Verdict | None  # scan
    ids: np.ndarray | None  # write
    pii_size: int = 0  # write: bytes before scrubbing
    pii_replaced: tuple[tuple[str, int], ...] = ()  # write: (label, replacements)


class Result(NamedTuple):
    """A span's documents in order, its bad records, and the file-level problem that ended the file in it."""

    file: int
    done: list[Done]
    bad: list[BadRecord]
    failed: BadRecord | None
    through: int = 0  # the span's Span.through: how far into its file the pass got


class Job(NamedTuple):
    """What a pass asks of the workers: how to read, the stage settings, and for the write pass how to encode."""

    settings: StageSettings
    text_field: str
    val_fraction: float
    sample_fraction: float = 0.0  # scan: the share of training documents whose text comes back to train the BPE
    tokenizer: str | None = None  # None: the scan
    fast: bool = False  # tiktoken, checked at load to give the tokenizer's own ids
    drops: str | None = None  # write: the scan's list of dropped documents
    after: tuple[int, int] | None = None  # write, resuming: only documents after this (file, ordinal)
    tombstones: frozenset = frozenset()  # scan: content hashes of removed documents, dropped as the stage `tombstone`


_state: dict = {}


def _worker_start() -> None:
    die_with_parent()  # a pool owner killed outright must not leave its workers running
    # Ctrl-C reaches a terminal's whole process group: the main process alone decides to stop, and ends the pool
    # (a worker started with the pool inherits the ignored signal; this holds for any started later).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker is one core's worth; the tokenizer's own thread pool would only oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _load(job: Job) -> None:
    """Build a job's encoder and hasher once per process; the next pass's job replaces them."""
    if _state.get("job") == job:
        return
    encoder = None if job.tokenizer is None else Encoder(job.tokenizer, job.fast)
    threshold = job.settings.dedup_near_threshold
    hasher = MinHasher(threshold) if threshold and encoder is None else None
    _state.update(job=job, encoder=encoder, hasher=hasher)


def _run(job: Job, span: Span) -> Result:
    """Read and parse a span, then run the pass's stages on its documents."""
    _load(job)
    docs, bad, failed = [], [], None
    try:
        for record in read_span(span, job.text_field):
            if isinstance(record, BadRecord):
                bad.append(record)
            elif record[1] and not record[1].isspace():
                docs.append(record)
    except BadRecord as e:
        failed = e
    if job.after is not None and span.file == job.after[0]:
        docs = [d for d in docs if d[0] > job.after[1]]  # written before the crash
    if job.drops is not None and docs:
        dropped = dropped_in(Path(job.drops), span.file, docs[0][0], docs[-1][0])
        docs = [d for d in docs if d[0] not in dropped]  # the scan decided the filters and dedup, in order
    hashes = [doc_hashes(span.source.key, ordinal) for ordinal, _ in docs]
    encoder: Encoder | None = _state["encoder"]
    if encoder is None:
        hasher, s, dead = _state["hasher"], job.settings, job.tombstones
        wants = [split >= job.val_fraction and sample < job.sample_fraction for split, sample in hashes]
        done = [
            Done(o, split, assess(text, s, hasher, want, dead), None)
            for (o, text), (split, _), want in zip(docs, hashes, wants, strict=True)
        ]
        return Result(span.file, done, bad, failed, span.through)
    cleaned = [clean(text, job.settings) for _, text in docs]
    ids = encoder.encode([text for text, _, _ in cleaned])
    eos = np.array([encoder.eos], dtype=np.uint32)
    done = [
        Done(o, split, None, np.concatenate([doc, eos]), size, replaced)
        for (o, _), (split, _), doc, (_, size, replaced) in zip(docs, hashes, ids, cleaned, strict=True)
    ]
    return Result(span.file, done, bad, failed, span.through)


def resolve_workers(requested: int, total_bytes: int) -> int:
    """Processes to use: every core for 0, never more than there are tasks' worth of input."""
    if requested < 0:
        raise ConfigError(f"prepare.workers ({requested}) must be 0 (every core) or a positive process count")
    wanted = requested or os.cpu_count() or 1
    return max(1, min(wanted, -(-total_bytes // TASK_CHARS)))


class StagePool:
    """Runs tasks in `workers` processes (inline for 1) and yields results in task order, a bounded window ahead."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor = None
        _state.clear()  # inline runs share this process: never reuse a tokenizer loaded for another dataset
        if workers > 1:
            # Spawned: each worker is this process's own child, so it dies with it (a forkserver outlives a killed
            # owner, and its workers with it). Not forked: a fork of a process with threads can deadlock.
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start)
            # All started now, with Ctrl-C ignored from their first instruction (an ignored signal stays ignored
            # through exec): a worker still importing when Ctrl-C reaches the process group would die with a fatal
            # error on the terminal. The executor starts a process for each task it has no idle worker for.
            main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                for _ in range(workers):
                    self._executor.submit(os.getpid)
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)

    def map(self, job: Job, work: Iterable[Span]) -> Iterator[Result]:
        """Results of each span, in the order the spans were given."""
        return self.run(partial(_run, job), work)

    def run(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn of each item in the worker processes (a module-level function, to be pickled), in the items' order."""
        if self._executor is None:
            yield from map(fn, items)
            return
        pending: deque[Future] = deque()
        for item in items:
            pending.append(self._executor.submit(fn, item))
            if len(pending) >= 2 * self.workers:  # bounded: the caller never runs far ahead of the workers
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        """Stop the worker processes (work still queued is dropped)."""
        _state.clear()
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
