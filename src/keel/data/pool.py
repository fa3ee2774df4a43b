"""The stateless document work of `keel data prepare` (stages, dedup keys, tokenization) over a process pool."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import NamedTuple

import numpy as np

from keel.data.minhash import MinHasher
from keel.data.stages import StageSettings, Verdict, assess, clean
from keel.data.tokenizer import Encoder
from keel.errors import ConfigError

TASK_CHARS = 1_000_000  # text per pool task: large enough that pickling is cheap next to the work


class Doc(NamedTuple):
    """A raw document sent to a worker: where it is from and whether its processed text must come back."""

    file: int
    ordinal: int
    text: str
    want_text: bool = False


class Done(NamedTuple):
    """A worker's result for one document: the scan's verdict, or the write pass's ids (ending in EOS) and PII count."""

    file: int
    ordinal: int
    verdict: Verdict | None  # scan
    ids: np.ndarray | None  # write
    pii_size: int = 0  # write: bytes before scrubbing
    pii_replaced: int = 0


class Job(NamedTuple):
    """What a pass asks of the workers: the stage settings, the tokenizer to encode with (None: scan), which encoder."""

    settings: StageSettings
    tokenizer: str | None
    fast: bool = False  # tiktoken, checked at load to give the tokenizer's own ids


_state: dict = {}


def _single_threaded() -> None:
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


def _run(job: Job, task: list[Doc]) -> list[Done]:
    _load(job)
    encoder: Encoder | None = _state["encoder"]
    if encoder is None:
        hasher = _state["hasher"]
        return [Done(d.file, d.ordinal, assess(d.text, job.settings, hasher, d.want_text), None) for d in task]
    cleaned = [clean(d.text, job.settings) for d in task]
    ids = encoder.encode([text for text, _, _ in cleaned])
    eos = np.array([encoder.eos], dtype=np.uint32)
    return [
        Done(d.file, d.ordinal, None, np.concatenate([doc, eos]), size, replaced)
        for d, doc, (_, size, replaced) in zip(task, ids, cleaned, strict=True)
    ]


def resolve_workers(requested: int, total_bytes: int) -> int:
    """Processes to use: every core for 0, never more than there are tasks' worth of input."""
    if requested < 0:
        raise ConfigError(f"prepare.workers ({requested}) must be 0 (every core) or a positive process count")
    wanted = requested or os.cpu_count() or 1
    return max(1, min(wanted, -(-total_bytes // TASK_CHARS)))


def tasks(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    """Group documents into tasks of about TASK_CHARS characters, in order."""
    task, chars = [], 0
    for doc in docs:
        task.append(doc)
        chars += len(doc.text)
        if chars >= TASK_CHARS:
            yield task
            task, chars = [], 0
    if task:
        yield task


class StagePool:
    """Runs tasks in `workers` processes (inline for 1) and yields results in task order, a bounded window ahead."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor = None
        _state.clear()  # inline runs share this process: never reuse a tokenizer loaded for another dataset
        if workers > 1:
            # forkserver / spawn: a fork of a process with threads (the tokenizer's, torch's) can deadlock.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded)

    def map(self, job: Job, work: Iterable[list[Doc]]) -> Iterator[list[Done]]:
        """Results of each task, in the order the tasks were given."""
        if self._executor is None:
            yield from (_run(job, task) for task in work)
            return
        pending: deque[Future] = deque()
        for task in work:
            pending.append(self._executor.submit(_run, job, task))
            if len(pending) >= 2 * self.workers:  # bounded: the reader never runs far ahead of the workers
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        """Stop the worker processes (work still queued is dropped)."""
        _state.clear()
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
