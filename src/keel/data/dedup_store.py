"""Exact and near-duplicate state of a scan: keys gathered as the scan reads, duplicates decided when it has read all.

The rules are those of one document at a time in document order. Exact: an earlier document had the same 128-bit
digest. Near, by LSH agreement as datatrove does: one of the document's band keys (64-bit hashes of its MinHash bands,
computed in the pool workers) is a band key of an earlier kept document; no signature is kept to verify the candidate.
While the scan reads, each document's record goes to a pending log (scan order) and its digest and band keys to
partitions on disk; `decide()` sorts them a partition at a time (keel.data.dedup_sort) and walks the pending log with
the verdicts. Why not hash tables looked up as the scan reads: each new key is a random store into gigabytes of table,
which slowed the store by a quarter over 10 M documents and faults again on every page the kernel writes back. What
stays on disk (the store) is logs in kept-document order, what a merge joins on: origins (file, ordinal), content
digests, band keys, and the digests of the documents near dedup dropped.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from keel.data import dedup_sort
from keel.data.dedup_sort import BAND_ROW, DIGEST_ROW, EXACT, KEPT, NEAR, Each, mark_exact, mark_near
from keel.data.minhash import MinHasher
from keel.data.partitions import Partitions, chunks
from keel.errors import DataError
from keel.io import atomic_write_json, fsync_path

STORE = "dedup"
META = "store.json"
DIGEST = np.dtype([("k", "<u8"), ("k2", "<u8")])  # the 128-bit digest
MAX_DOCUMENTS = 2**32 - 1  # a document's number in the scan is 32 bits
FORMAT = 2  # 1 (no "format" in store.json): hash tables and every kept signature; 2: the logs a merge joins
STAGES = {EXACT: "dedup_exact", NEAR: "dedup_near"}
_SCRATCH = ("pending.bin", "repeats.bin", "verdicts.bin", "digests", "bands", "pairs")  # gone once decided


class Keys(NamedTuple):
    """One document's dedup keys, as the scan computed them."""

    file: int
    ordinal: int
    digest: bytes | None  # 16 bytes
    bands: bytes | None  # uint64 per band


class Kept(NamedTuple):
    """A batch of kept documents, as arrays: their rows (kept-document numbers), origins and keys."""

    rows: np.ndarray  # int64
    files: np.ndarray  # int64
    ordinals: np.ndarray  # int64
    digests: np.ndarray | None  # DIGEST
    bands: np.ndarray | None  # uint64, one row of band keys per document


class Decided(NamedTuple):
    """A run of the scanned documents, in scan order, with dedup's verdicts."""

    files: np.ndarray  # int64
    ordinals: np.ndarray  # int64
    verdicts: np.ndarray  # uint8: KEPT, EXACT or NEAR (STAGES names the stage)
    notes: np.ndarray | None  # what the scan gave `add` with each document


class _Logs(NamedTuple):
    origins: BinaryIO  # uint32 per kept document: its ordinal's low 32 bits
    runs: BinaryIO  # int64 (first row, file, ordinal >> 32) whenever the file or the ordinal's high bits change
    digests: BinaryIO | None  # 16 bytes per kept document
    bands: BinaryIO | None  # uint64 per band per kept document
    near: BinaryIO | None  # 16 bytes per document dropped as a near duplicate (exact and near on): merges look them up


class DedupStore:
    """The dedup keys of the documents scanned (kept ones, in order, once decided), for verdicts and merges."""

    def __init__(
        self, path: Path, exact: bool, near_threshold: float, readonly: bool = False, note: np.dtype | None = None
    ):
        self.path, self.exact, self.readonly = Path(path), exact, readonly
        self.bands = MinHasher(near_threshold).bands if near_threshold else 0
        if readonly:
            try:
                meta = json.loads((self.path / META).read_text())
            except (OSError, ValueError):
                raise DataError(
                    f"{self.path} is missing: the dedup keys of this dataset are gone; prepare it again"
                ) from None
            if meta.get("format") != FORMAT:
                raise DataError(f"{self.path}: dedup keys of an older Keel; prepare this part again to merge it")
        else:
            shutil.rmtree(self.path, ignore_errors=True)  # what a crashed scan left is not trusted
            self.path.mkdir(parents=True)
            meta = {"kept": 0}
        self.kept, self.scanned, self._run = meta["kept"], 0, (-1, -1)
        mode = "rb" if readonly else "ab+"
        self._logs = _Logs(
            *(open(self.path / f"{n}.log", mode) for n in ("origins", "runs")),
            *(open(self.path / f"{n}.log", mode) if on else None for n, on in self._parts()),
        )
        fields = [("file", "<i8"), ("ordinal", "<i8")]
        fields += [("digest", DIGEST)] if exact else []
        fields += [("bands", "<u8", (self.bands,))] if self.bands else []
        self._record = np.dtype(fields + ([("note", note)] if note is not None else []))
        if not readonly:
            self._pending = open(self.path / "pending.bin", "wb+")
            self._repeats = open(self.path / "repeats.bin", "wb+")  # exact repeats found within a batch
            self._digests = Partitions(self.path / "digests", DIGEST_ROW) if exact else None
            self._band_keys = Partitions(self.path / "bands", BAND_ROW) if self.bands else None

    def _parts(self) -> list[tuple[str, bool]]:
        """The optional logs and whether this store keeps them."""
        return [("digests", self.exact), ("bands", bool(self.bands)), ("near", self.exact and bool(self.bands))]

    def add(self, docs: list[Keys], notes: np.ndarray | None = None) -> None:
        """Take the next documents of the scan (and a note for each, returned with its verdict); decided later."""
        n = len(docs)
        if self.scanned + n > MAX_DOCUMENTS:
            raise DataError(f"{self.path}: more than {MAX_DOCUMENTS} documents in one store; prepare in --shard parts")
        records = np.zeros(n, self._record)
        records["file"] = [d.file for d in docs]
        records["ordinal"] = [d.ordinal for d in docs]
        seq = np.arange(self.scanned, self.scanned + n, dtype=np.uint32)
        holders = np.ones(n, bool)
        if self.exact:
            records["digest"] = digests = _digests(docs)
            # A batch's own repeats are decided here: only each digest's first copy goes to the partitions, so a
            # digest repeated millions of times costs a partition one row a batch.
            _, first = np.unique(digests.view(np.dtype((np.void, 16))), return_index=True)
            holders[:] = False
            holders[first] = True
            self._repeats.write(seq[~holders].tobytes())
            rows = np.zeros(len(first), DIGEST_ROW)
            rows["k"], rows["k2"], rows["seq"] = digests["k"][first], digests["k2"][first], seq[first]
            self._digests.add(rows)
        if self.bands:
            keys = np.frombuffer(b"".join(d.bands or b"" for d in docs), "<u8").reshape(n, self.bands)
            records["bands"] = keys
            rows = np.zeros(int(holders.sum()) * self.bands, BAND_ROW)  # an exact repeat holds no band key
            held = keys[holders].ravel()
            rows["k"] = np.where(held == 0, np.uint64(1), held)  # as the stores before format 2's sort kept them
            rows["seq"] = np.repeat(seq[holders], self.bands)
            self._band_keys.add(rows)
        if notes is not None:
            records["note"] = notes
        self._pending.write(records.tobytes())
        self.scanned += n

    def decide(
        self, batch: int = 1 << 16, log: Callable[[str], None] = lambda _: None, each: Each = map, processes: int = 1
    ) -> Iterator[Decided]:
        """The scanned documents' verdicts in scan order, a batch at a time; the kept ones are logged as they go.

        `each` sorts the partitions (a process pool's map, in `processes` processes, or map in this one); together
        they hold at most dedup_sort.BUDGET bytes of keys at once.
        """
        budget = max(dedup_sort.BUDGET // processes, 1 << 20)
        self._pending.flush()
        verdicts = np.zeros(self.scanned, np.uint8)
        if self.scanned:
            verdicts = np.memmap(self.path / "verdicts.bin", np.uint8, "w+", shape=(self.scanned,))  # not in RAM
            self._repeats.close()
            for repeats in chunks(self.path / "repeats.bin", np.dtype(np.uint32)):  # a batch's own repeats
                verdicts[repeats] = EXACT
            if self._digests is not None:
                mark_exact(self._digests, verdicts, log, each, budget)
            if self._band_keys is not None:
                mark_near(self._band_keys, verdicts, self.path / "pairs", log, each, budget)
        self._pending.seek(0)
        for lo in range(0, self.scanned, batch):
            records = np.fromfile(self._pending, self._record, min(batch, self.scanned - lo))
            codes = np.array(verdicts[lo : lo + len(records)])
            self._append(records[codes == KEPT])
            if self._logs.near is not None:
                self._logs.near.write(records["digest"][codes == NEAR].tobytes())
            yield Decided(
                records["file"], records["ordinal"], codes, records["note"] if "note" in records.dtype.names else None
            )
        del verdicts
        self._drop_scratch()

    def _append(self, kept: np.ndarray) -> None:
        files, ordinals = kept["file"], kept["ordinal"]
        high = ordinals >> 32
        before_f, before_h = np.empty_like(files), np.empty_like(high)
        before_f[:1], before_h[:1] = self._run
        before_f[1:], before_h[1:] = files[:-1], high[:-1]
        change = np.flatnonzero((files != before_f) | (high != before_h))
        if len(kept):
            self._run = (int(files[-1]), int(high[-1]))
        runs = np.stack([self.kept + change, files[change], high[change]], axis=1)
        self._logs.runs.write(runs.astype(np.int64).tobytes())
        self._logs.origins.write(ordinals.astype(np.uint32).tobytes())
        if self._logs.digests is not None:
            self._logs.digests.write(kept["digest"].tobytes())
        if self._logs.bands is not None:
            self._logs.bands.write(kept["bands"].tobytes())
        self.kept += len(kept)

    def _drop_scratch(self) -> None:
        for f in (self._pending, self._repeats):
            f.close()
        for name in _SCRATCH:
            path = self.path / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def kept_batches(self, batch: int = 1 << 16) -> Iterator[Kept]:
        """The kept documents' origins and keys, in order, a batch at a time."""
        runs = np.frombuffer(_read(self._logs.runs, 0, -1), np.int64).reshape(-1, 3)
        for lo in range(0, self.kept, batch):
            rows = np.arange(lo, min(lo + batch, self.kept))
            run = runs[np.searchsorted(runs[:, 0], rows, side="right") - 1]
            low = np.frombuffer(_read(self._logs.origins, 4 * lo, 4 * len(rows)), np.uint32)
            yield Kept(
                rows,
                run[:, 1].copy(),
                (run[:, 2] << 32) | low.astype(np.int64),
                np.frombuffer(_read(self._logs.digests, 16 * lo, 16 * len(rows)), DIGEST) if self.exact else None,
                self._bands_of(lo, len(rows)) if self.bands else None,
            )

    def _bands_of(self, lo: int, n: int) -> np.ndarray:
        assert self._logs.bands is not None
        size = 8 * self.bands
        return np.frombuffer(_read(self._logs.bands, size * lo, size * n), "<u8").reshape(n, self.bands)

    def near_digests(self, batch: int = 1 << 16) -> Iterator[np.ndarray]:
        """The digests of the documents dropped as near duplicates (an exact copy of one is a duplicate too)."""
        if self._logs.near is None:
            return
        for lo in range(0, os.fstat(self._logs.near.fileno()).st_size, 16 * batch):
            yield np.frombuffer(_read(self._logs.near, lo, 16 * batch), DIGEST)

    def bytes_on_disk(self) -> int:
        """The disk space the store takes now (logs, and until the scan is decided, its pending keys)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.rglob("*") if p.is_file())

    def close(self) -> None:
        """Write the logs back and fsync them, delete the tables, and record the count: a journal can trust it."""
        for f in self._logs:
            if f is not None:
                if not self.readonly:
                    f.flush()
                    fsync_path(Path(f.name))
                f.close()
        if not self.readonly:
            self._drop_scratch()
        if not self.readonly:
            atomic_write_json(self.path / META, {"format": FORMAT, "kept": self.kept})


def _digests(docs: list[Keys]) -> np.ndarray:
    raw = np.frombuffer(b"".join(d.digest or b"" for d in docs), np.uint64).reshape(len(docs), 2)
    entries = np.zeros(len(docs), DIGEST)
    entries["k"] = np.where(raw[:, 0] == 0, np.uint64(1), raw[:, 0])  # as stores before format 2's sort kept them
    entries["k2"] = raw[:, 1]
    return entries


def _read(f: BinaryIO | None, offset: int, n: int) -> bytes:
    assert f is not None
    f.flush()
    f.seek(offset)
    return f.read(n)
