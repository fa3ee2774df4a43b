"""Exact and near-duplicate state of a scan, checked a batch of documents at a time in document order; RAM bounded.

Near duplicates are found by LSH agreement, as datatrove does: a document is a near duplicate if one of its band keys
(64-bit hashes of its MinHash bands, computed in the pool workers) is a band key of an earlier kept document. No
signature is kept to verify the candidate. What stays on disk (the store) is logs in kept-document order, what a merge
joins on: origins (file, ordinal), content digests, band keys, and the digests of the documents near dedup dropped.
While the scan runs, hash tables (keel.data.hashtable) of the digests and band keys seen so far answer the lookups;
the scan rebuilds them from nothing, and closing the store deletes them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from keel.data.hashtable import ShardedTable
from keel.data.minhash import MinHasher
from keel.errors import DataError
from keel.io import atomic_write_json, fsync_path

STORE = "dedup"
META = "store.json"
EXACT = np.dtype([("k", "<u8"), ("k2", "<u8")])  # the 128-bit digest
BAND = np.dtype([("k", "<u8")])
MAX_KEPT = 2**32 - 1
SYNC_BYTES = 64 << 20  # the logs are written out every this many bytes
FORMAT = 2  # 1 (no "format" in store.json): hash tables and every kept signature; 2: the logs a merge joins


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
    digests: np.ndarray | None  # EXACT
    bands: np.ndarray | None  # uint64, one row of band keys per document


class _Logs(NamedTuple):
    origins: BinaryIO  # uint32 per kept document: its ordinal's low 32 bits
    runs: BinaryIO  # int64 (first row, file, ordinal >> 32) whenever the file or the ordinal's high bits change
    digests: BinaryIO | None  # 16 bytes per kept document
    bands: BinaryIO | None  # uint64 per band per kept document
    near: BinaryIO | None  # 16 bytes per document dropped as a near duplicate (exact and near on): merges look them up


class DedupStore:
    """The dedup keys of the documents seen so far (kept ones, in order), for batched checks and merges."""

    def __init__(self, path: Path, exact: bool, near_threshold: float, readonly: bool = False):
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
        self.kept, self._synced, self._run = meta["kept"], 0, (-1, -1)
        mode = "rb" if readonly else "ab+"
        self._logs = _Logs(
            *(open(self.path / f"{n}.log", mode) for n in ("origins", "runs")),
            *(open(self.path / f"{n}.log", mode) if on else None for n, on in self._parts()),
        )
        writable = not readonly
        # About one digest a document: in 4 shards, not 16, a batch's lookups in each are many enough that numpy's
        # cost per call does not dominate.
        self._digests = ShardedTable(self.path, "exact", EXACT, shard_bits=2) if exact and writable else None
        self._band_keys = ShardedTable(self.path, "band", BAND) if self.bands and writable else None

    def _parts(self) -> list[tuple[str, bool]]:
        """The optional logs and whether this store keeps them."""
        return [("digests", self.exact), ("bands", bool(self.bands)), ("near", self.exact and bool(self.bands))]

    def check(self, docs: list[Keys]) -> list[str | None]:
        """The dedup stage dropping each document ("dedup_exact" / "dedup_near") or None, as if one at a time."""
        n = len(docs)
        out: list[str | None] = [None] * n
        if n == 0:
            return out
        alive, digests = np.ones(n, bool), None
        if self._digests is not None:
            digests = _digests(docs)
            new = np.zeros(n, bool)
            _, first = np.unique(digests.view(np.dtype((np.void, 16))), return_index=True)
            new[first] = True
            new &= self._digests.find(digests)["k"] == 0  # an earlier document (stored, or in the batch) had it
            for i in np.flatnonzero(~new):
                out[i] = "dedup_exact"
            self._digests.insert(digests[new])
            alive = new
        kept = np.flatnonzero(alive)
        if self._band_keys is not None and len(kept):
            near = self._near(docs, kept)
            for i in kept[near]:
                out[i] = "dedup_near"
            if digests is not None and self._logs.near is not None:
                self._logs.near.write(digests[kept[near]].tobytes())
            kept = kept[~near]
        self._append(docs, kept, digests)
        return out

    def _near(self, docs: list[Keys], alive: np.ndarray) -> np.ndarray:
        """Which alive documents share a band key with an earlier kept one; the kept ones' keys are added."""
        assert self._band_keys is not None
        keys = np.frombuffer(b"".join(docs[i].bands or b"" for i in alive), "<u8").reshape(len(alive), self.bands)
        keys = np.where(keys == 0, np.uint64(1), keys)  # 0 marks an empty slot
        entries = np.zeros(keys.size, BAND)
        entries["k"] = keys.ravel()
        near = (self._band_keys.find(entries)["k"] != 0).reshape(keys.shape).any(axis=1)
        unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        inverse = inverse.reshape(keys.shape)
        taken = np.zeros(len(unique), bool)  # the key is a band key of a kept document earlier in the batch
        # Only documents with a key that recurs in the batch depend on the decisions before them: those go in order.
        for j in np.flatnonzero(~near & (counts[inverse] > 1).any(axis=1)).tolist():
            if taken[inverse[j]].any():
                near[j] = True
            else:
                taken[inverse[j]] = True
        new = np.unique(keys[~near])  # distinct: a key two kept documents shared would have dropped the second
        add = np.zeros(len(new), BAND)
        add["k"] = new
        self._band_keys.insert(add)
        return near

    def _append(self, docs: list[Keys], kept: np.ndarray, digests: np.ndarray | None) -> None:
        if self.kept + len(kept) > MAX_KEPT:
            raise DataError(f"{self.path}: more than {MAX_KEPT} kept documents in one store; prepare in --shard parts")
        files = np.fromiter((docs[i].file for i in kept.tolist()), np.int64, len(kept))
        ordinals = np.fromiter((docs[i].ordinal for i in kept.tolist()), np.int64, len(kept))
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
        if self._logs.digests is not None and digests is not None:
            self._logs.digests.write(digests[kept].tobytes())
        if self._logs.bands is not None:
            self._logs.bands.write(b"".join(docs[i].bands or b"" for i in kept.tolist()))
        self.kept += len(kept)
        written = self.kept * (4 + 16 * self.exact + 8 * self.bands)
        if written // SYNC_BYTES != self._synced:
            # Written out now, the logs' pages stay cached but clean: the kernel's background writeback is not
            # set off by them, and so does not keep writing back (and write-protecting) the tables' pages.
            self._synced = written // SYNC_BYTES
            for f in self._logs:
                if f is not None:
                    f.flush()
                    os.fdatasync(f.fileno())

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
                np.frombuffer(_read(self._logs.digests, 16 * lo, 16 * len(rows)), EXACT) if self.exact else None,
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
            yield np.frombuffer(_read(self._logs.near, lo, 16 * batch), EXACT)

    def bytes_on_disk(self) -> int:
        """The disk space the store takes now (logs, and while it is open for a scan, the tables)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())

    def close(self) -> None:
        """Write the logs back and fsync them, delete the tables, and record the count: a journal can trust it."""
        for f in self._logs:
            if f is not None:
                if not self.readonly:
                    f.flush()
                    fsync_path(Path(f.name))
                f.close()
        for table in (self._digests, self._band_keys):
            if table is not None:
                table.delete()
        if not self.readonly:
            atomic_write_json(self.path / META, {"format": FORMAT, "kept": self.kept})


def _digests(docs: list[Keys]) -> np.ndarray:
    raw = np.frombuffer(b"".join(d.digest or b"" for d in docs), np.uint64).reshape(len(docs), 2)
    entries = np.zeros(len(docs), EXACT)
    entries["k"] = np.where(raw[:, 0] == 0, np.uint64(1), raw[:, 0])  # 0 marks an empty slot
    entries["k2"] = raw[:, 1]
    return entries


def _read(f: BinaryIO | None, offset: int, n: int) -> bytes:
    assert f is not None
    f.flush()
    f.seek(offset)
    return f.read(n)
