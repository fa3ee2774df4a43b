"""The scan pass of `keel data prepare`: count, pick the splits, fill the dedup store, sample for the tokenizer."""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from keel.data.dedup_store import KEPT, STAGES, DedupStore, Keys
from keel.data.drops import DEDUP_DROPS, DropWriter
from keel.data.pool import Job, Result, StagePool
from keel.data.progress import PassProgress
from keel.data.sources import Sources
from keel.data.spans import plan
from keel.data.stages import Pipeline, StageSettings
from keel.errors import DataError

TRAIN_SAMPLE_CHARS = 16_000_000  # a BPE trained on ~16 MB is as good as on more, in a fraction of the time
DEDUP_BATCH = 4096  # documents per dedup-store add: large enough that its array work dwarfs its overhead
OFFERED = "sample-offered.bin"  # in staging: sample text of documents dedup has yet to decide, in scan order
NOTE = np.dtype([("split", "<f8"), ("size", "<i8")])  # what the scan needs back with a document's dedup verdict


@dataclass(frozen=True)
class Reading:
    """How documents are read and processed; every pass over the corpus reads them the same way."""

    text_field: str
    stages: StageSettings
    skip_bad: bool
    tombstones: frozenset = frozenset()  # content hashes of documents removed before: the scan drops them


@dataclass
class Scan:
    """What one pass over the corpus learns before anything is written."""

    val_fraction: float
    documents: int = 0
    val: int = 0
    lowest: tuple[float, tuple[int, int]] = (2.0, (-1, -1))  # (split hash, (file, ordinal)) of the first val pick
    highest: tuple[float, tuple[int, int]] = (-1.0, (-1, -1))  # ... and of the last train pick
    sample: list[str] = field(default_factory=list)
    per_source: list[dict] = field(default_factory=list)
    stages: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)  # where each stage first counted (Pipeline.first), to order the stages
    skipped: dict = field(default_factory=dict)
    tombstoned: list = field(default_factory=list)  # (file, ordinal) of each document a tombstone dropped

    def split_of(self, key: tuple[int, int], split_hash: float) -> str:
        """The document's split: by its hash, except that each split gets at least one document."""
        if self.val == 0 and key == self.lowest[1]:
            return "val"
        if self.val == self.documents and key == self.highest[1]:
            return "train"
        return "val" if split_hash < self.val_fraction else "train"

    def to_json(self) -> dict:
        """Everything but the tokenizer sample, for the progress file."""
        return {k: v for k, v in asdict(self).items() if k != "sample"}

    @classmethod
    def from_json(cls, d: dict) -> Scan:
        """The scan a progress file recorded (JSON turned its tuples into lists)."""
        low, high = d.pop("lowest"), d.pop("highest")
        return cls(**d, lowest=(low[0], tuple(low[1])), highest=(high[0], tuple(high[1])))


def scan(
    found: Sources,
    reading: Reading,
    val_fraction: float,
    sample_fraction: float,
    pool: StagePool,
    pipeline: Pipeline,
    drops: DropWriter,
    store: DedupStore | None,
    task_size: int,
    log: Callable[[str], None],
) -> Scan:
    """Read everything once: catch bad files, count, decide filters and dedup (recording drops), sample text."""
    result = Scan(
        val_fraction, per_source=[{"glob": g, "files": 0, "documents": 0, "bytes": 0} for g in found.includes]
    )
    for source in found.files:
        result.per_source[source.source]["files"] += 1
        result.per_source[source.source]["bytes"] += source.size
    progress = PassProgress("scan", [f.size for f in found.files], log)
    skipped: Counter = Counter()
    # Sample text of documents dedup has yet to decide waits on disk, beside the drop lists.
    tally = _Tally(result, found, _Offered(drops.path.with_name(OFFERED)) if store is not None else None)
    read = 0

    def counts() -> str:  # dedup's drops are decided once the scan has read everything
        dropped = sum(e.get("documents_dropped", 0) for e in pipeline.stats.values()) + sum(skipped.values())
        return f"{read:,} documents read, {dropped:,} dropped or skipped so far"

    job = Job(reading.stages, reading.text_field, val_fraction, sample_fraction, tombstones=reading.tombstones)
    batch: list[Result] = []
    for r in readable(pool.map(job, plan(found.files, reading.text_field, task_size)), reading.skip_bad, skipped):
        batch.append(r)
        read += len(r.done)
        if sum(len(b.done) for b in batch) >= DEDUP_BATCH:
            _decide(batch, pipeline, drops, store, tally)
            batch = []
        progress.update(r.file, r.through, counts)
    _decide(batch, pipeline, drops, store, tally)
    if store is not None:
        _settle(store, pipeline, DropWriter(drops.path.with_name(DEDUP_DROPS)), tally, pool, log)
    result.stages, result.first, result.skipped = pipeline.stats, pipeline.first, dict(skipped)
    result.tombstoned = pipeline.tombstoned
    if result.documents == 0:
        dropped = sum(e.get("documents_dropped", 0) for e in pipeline.stats.values()) + sum(skipped.values())
        raise DataError(
            f"prepare.sources: the {len(found.files)} matched files hold no text (empty corpus; "
            f"{dropped} documents were dropped or skipped)"
        )
    if result.documents == 1:
        raise DataError(
            "prepare.sources: the corpus is one document, but one is needed for training and one for validation; "
            "split it into several files or JSON Lines records"
        )
    return result


class _Tally:
    """Counts the kept documents into the scan's result, in document order: sources, splits, the tokenizer sample."""

    def __init__(self, result: Scan, found: Sources, offered: _Offered | None):
        self.result, self.offered = result, offered
        self.sources = np.array([f.source for f in found.files], np.int64)  # each file's source
        self.sampled = 0  # characters in the sample

    def keep(self, files: np.ndarray, ordinals: np.ndarray, splits: np.ndarray, samples: list[tuple[int, str]]) -> None:
        """Count kept documents, given as arrays in document order; samples: (position, text) of those offering text."""
        r = self.result
        if not len(files):
            return
        r.documents += len(files)
        for source, n in enumerate(np.bincount(self.sources[files], minlength=len(r.per_source)).tolist()):
            r.per_source[source]["documents"] += n
        order = np.lexsort((ordinals, files, splits))  # by split hash, then (file, ordinal)
        low, high = int(order[0]), int(order[-1])
        r.lowest = min(r.lowest, (float(splits[low]), (int(files[low]), int(ordinals[low]))))
        r.highest = max(r.highest, (float(splits[high]), (int(files[high]), int(ordinals[high]))))
        val = splits < r.val_fraction
        r.val += int(val.sum())
        for i, text in samples:
            if not val[i] and self.sampled < 2 * TRAIN_SAMPLE_CHARS:
                r.sample.append(text)
                self.sampled += len(text)


def _decide(
    batch: list[Result], pipeline: Pipeline, drops: DropWriter, store: DedupStore | None, tally: _Tally
) -> None:
    """Apply the filters' verdicts to a batch of spans' documents in order; keep them, or hand them to dedup."""
    done = [(r.file, d) for r in batch for d in r.done]
    passed = pipeline.accept([(file, d.ordinal, d.verdict) for file, d in done])
    kept = []
    for (file, d), ok in zip(done, passed, strict=True):
        if ok:
            kept.append((file, d))
        else:
            drops.add(file, d.ordinal)
    files = np.array([file for file, _ in kept], np.int64)
    ordinals = np.array([d.ordinal for _, d in kept], np.int64)
    splits = np.array([d.split_hash for _, d in kept], np.float64)
    samples = [(i, d.verdict.sample) for i, (_, d) in enumerate(kept) if d.verdict.sample is not None]
    if store is None:
        tally.keep(files, ordinals, splits, samples)
        return
    assert tally.offered is not None
    for i, text in samples:
        tally.offered.add(store.scanned + i, text)
    if kept:
        notes = np.zeros(len(kept), NOTE)
        notes["split"], notes["size"] = splits, [d.verdict.size for _, d in kept]
        store.add([Keys(file, d.ordinal, d.verdict.digest, d.verdict.bands) for file, d in kept], notes)


def _settle(
    store: DedupStore, pipeline: Pipeline, drops: DropWriter, tally: _Tally, pool: StagePool, log: Callable[[str], None]
) -> None:
    """Dedup's verdicts (its partitions sorted in the pool), in document order: count and record drops, keep others."""
    t0, seq = time.perf_counter(), 0
    log(f"dedup: deciding {store.scanned:,} documents' keys, sorted a partition at a time")
    progress = PassProgress("dedup, verdicts", [store.scanned], log, unit="M documents")
    assert tally.offered is not None
    try:
        for run in store.decide(log=log, each=pool.run, processes=pool.workers):
            assert run.notes is not None
            files, ordinals, verdicts = run.files, run.ordinals, run.verdicts
            for code, stage in STAGES.items():
                hit = np.flatnonzero(verdicts == code)
                if len(hit):
                    first = hit[0]  # the run is in document order
                    size = int(run.notes["size"][hit].sum())
                    pipeline.count(stage, "dropped", size, int(files[first]), int(ordinals[first]), len(hit))
            kept = verdicts == KEPT
            drops.add_many(files[~kept], ordinals[~kept])
            position = np.cumsum(kept) - 1  # a kept document's place among the kept ones
            samples = [
                (int(position[i - seq]), text) for i, text in tally.offered.upto(seq + len(verdicts)) if kept[i - seq]
            ]
            tally.keep(files[kept], ordinals[kept], run.notes["split"][kept], samples)
            seq += len(verdicts)
            progress.update(0, seq, lambda: "in document order")
    finally:
        drops.close()
        tally.offered.close()
    dropped = {stage: pipeline.stats.get(stage, {}).get("documents_dropped", 0) for stage in STAGES.values()}
    log(
        f"dedup: decided {seq:,} documents in {time.perf_counter() - t0:.1f} s "
        f"({dropped['dedup_exact']:,} exact and {dropped['dedup_near']:,} near duplicates)"
    )


class _Offered:
    """Sample text offered by documents dedup has yet to decide: on disk in scan order, read back as verdicts come.

    Not held in RAM and not capped: the sample's cap counts kept documents only, which are known once dedup decides;
    what is offered is about one sample's worth (more where the sources are compressed: the share offered is
    set from their sizes on disk).
    """

    _HEAD = struct.Struct("<QI")  # scan number, bytes of text

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "wb+")
        self._reading = False

    def add(self, seq: int, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")  # JSON may hold lone surrogates
        self._file.write(self._HEAD.pack(seq, len(data)) + data)

    def upto(self, end: int) -> Iterator[tuple[int, str]]:
        """The (scan number, text) offered by documents before `end` not read yet, in order."""
        if not self._reading:
            self._file.flush()
            self._file.seek(0)
            self._reading = True
        while head := self._file.read(self._HEAD.size):
            seq, size = self._HEAD.unpack(head)
            if seq >= end:
                self._file.seek(-self._HEAD.size, os.SEEK_CUR)
                return
            yield seq, self._file.read(size).decode("utf-8", "surrogatepass")

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def readable(results: Iterable[Result], skip_bad: bool, skipped: Counter) -> Iterator[Result]:
    """The spans' results with bad records raised, or counted and left out; a file-level problem ends its file."""
    ended: set[int] = set()
    for r in results:
        if r.file in ended:
            continue  # the file ended in an earlier span: its later spans were read for nothing
        for bad in r.bad:
            if not skip_bad:
                raise bad
            skipped[bad.kind] += 1
        if r.failed is not None:
            if not skip_bad:
                raise r.failed
            skipped[r.failed.kind] += 1
            ended.add(r.file)
        yield r
