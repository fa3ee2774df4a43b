"""The scan pass of `keel data prepare`: count, pick the splits, fill the dedup store, sample for the tokenizer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from keel.data.drops import DropWriter
from keel.data.pool import Job, Result, StagePool
from keel.data.progress import PassProgress
from keel.data.sources import Sources
from keel.data.spans import plan
from keel.data.stages import Pipeline, StageSettings
from keel.errors import DataError

TRAIN_SAMPLE_CHARS = 16_000_000  # a BPE trained on ~16 MB is as good as on more, in a fraction of the time
DEDUP_BATCH = 4096  # documents per dedup-store check: large enough that its array work dwarfs its overhead


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
    read = 0

    def counts() -> str:  # drops are decided a batch at a time: they trail the documents read
        dropped = sum(e.get("documents_dropped", 0) for e in pipeline.stats.values()) + sum(skipped.values())
        return f"{read:,} documents read, {dropped:,} dropped or skipped so far"

    job = Job(reading.stages, reading.text_field, val_fraction, sample_fraction, tombstones=reading.tombstones)
    batch: list[Result] = []
    for r in readable(pool.map(job, plan(found.files, reading.text_field, task_size)), reading.skip_bad, skipped):
        batch.append(r)
        read += len(r.done)
        if sum(len(b.done) for b in batch) >= DEDUP_BATCH:
            _decide(batch, found, pipeline, drops, result)
            batch = []
        progress.update(r.file, r.through, counts)
    _decide(batch, found, pipeline, drops, result)
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


def _decide(batch: list[Result], found: Sources, pipeline: Pipeline, drops: DropWriter, result: Scan) -> None:
    """Apply the filters' verdicts and dedup to a batch of spans' documents in order; count, split, sample."""
    docs = [(r.file, d.ordinal, d.verdict) for r in batch for d in r.done]
    kept = iter(pipeline.accept(docs))  # type: ignore[arg-type]
    sampled = sum(map(len, result.sample))
    for r in batch:
        for d in r.done:
            key = (r.file, d.ordinal)
            if not next(kept):
                drops.add(*key)
                continue
            result.documents += 1
            result.per_source[found.files[r.file].source]["documents"] += 1
            result.lowest = min(result.lowest, (d.split_hash, key))
            result.highest = max(result.highest, (d.split_hash, key))
            if d.split_hash < result.val_fraction:
                result.val += 1
            elif d.verdict is not None and d.verdict.sample is not None and sampled < 2 * TRAIN_SAMPLE_CHARS:
                result.sample.append(d.verdict.sample)
                sampled += len(d.verdict.sample)


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
