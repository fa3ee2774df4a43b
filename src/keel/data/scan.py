"""The scan pass of `keel data prepare`: count, pick the splits, fill the dedup store, sample for the tokenizer."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from keel.data.drops import DropWriter
from keel.data.pool import Doc, Job, StagePool, tasks
from keel.data.sources import Sources, read_documents
from keel.data.stages import Pipeline, StageSettings
from keel.errors import DataError

TRAIN_SAMPLE_CHARS = 16_000_000  # a BPE trained on ~16 MB is as good as on more, in a fraction of the time


@dataclass(frozen=True)
class Reading:
    """How documents are read and processed; every pass over the corpus reads them the same way."""

    text_field: str
    stages: StageSettings
    skip_bad: bool


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


def doc_hashes(key: str, ordinal: int) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) for a document: one picks its split, one its sampling."""
    digest = hashlib.blake2b(f"{key}\0{ordinal}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / 2**64, int.from_bytes(digest[8:], "little") / 2**64


def raw_documents(
    found: Sources, reading: Reading, skipped: Counter, after: tuple[int, int] | None = None
) -> Iterator[tuple[int, int, str]]:
    """Every non-empty raw document as (file index, ordinal, text), starting after the (file, ordinal) `after`."""
    for index, source in enumerate(found.files):
        if after is not None and index < after[0]:
            continue  # finished before the crash: not even read again
        for ordinal, raw in read_documents(source.path, reading.text_field, skipped if reading.skip_bad else None):
            if after is not None and (index, ordinal) <= after:
                continue
            if raw and not raw.isspace():
                yield index, ordinal, raw


def scan(
    found: Sources,
    reading: Reading,
    val_fraction: float,
    sample_fraction: float,
    pool: StagePool,
    pipeline: Pipeline,
    drops: DropWriter,
) -> Scan:
    """Read everything once: catch bad files, count, decide filters and dedup (recording drops), sample text."""
    result = Scan(
        val_fraction, per_source=[{"glob": g, "files": 0, "documents": 0, "bytes": 0} for g in found.includes]
    )
    for source in found.files:
        result.per_source[source.source]["files"] += 1
        result.per_source[source.source]["bytes"] += os.path.getsize(source.path)
    skipped: Counter = Counter()
    hashes: dict[tuple[int, int], tuple[float, float]] = {}  # only for the documents in flight in the pool

    def docs() -> Iterator[Doc]:
        for index, ordinal, raw in raw_documents(found, reading, skipped):
            split_hash, sample_hash = hashes[(index, ordinal)] = doc_hashes(found.files[index].key, ordinal)
            yield Doc(index, ordinal, raw, split_hash >= val_fraction and sample_hash < sample_fraction)

    sampled = 0
    for done in pool.map(Job(reading.stages, None), tasks(docs())):
        for d in done:
            split_hash, _ = hashes.pop((d.file, d.ordinal))
            assert d.verdict is not None
            if not pipeline.accept(d.file, d.ordinal, d.verdict):
                drops.add(d.file, d.ordinal)
                continue
            result.documents += 1
            result.per_source[found.files[d.file].source]["documents"] += 1
            result.lowest = min(result.lowest, (split_hash, (d.file, d.ordinal)))
            result.highest = max(result.highest, (split_hash, (d.file, d.ordinal)))
            if split_hash < val_fraction:
                result.val += 1
            elif d.verdict.sample is not None and sampled < 2 * TRAIN_SAMPLE_CHARS:
                result.sample.append(d.verdict.sample)
                sampled += len(d.verdict.sample)
        if pipeline.store is not None:
            pipeline.store.commit()
    result.stages, result.first, result.skipped = pipeline.stats, pipeline.first, dict(skipped)
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
