"""Exact and near-duplicate state on disk, checked a batch of documents at a time; RAM stays bounded.

A directory: hash tables (keel.data.hashtable) of content digests and of LSH band keys (64-bit hashes computed
in the pool workers, each naming the kept document that first had it), and three logs in kept-document order:
(file, ordinal), the digest, the MinHash signature (each stored once). Decisions are the same as one document
at a time in document order: a document is an exact duplicate if an earlier one had its digest, a near
duplicate if the first kept document with one of its band keys has a signature similar enough.
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
BAND = np.dtype([("k", "<u8"), ("v", "<u4")])  # band key -> kept-document number (its signature's row)
MAX_KEPT = 2**32 - 1
SYNC_BYTES = 64 << 20  # the logs are written out every this many bytes


class Keys(NamedTuple):
    """One document's dedup keys, as the scan computed them."""

    file: int
    ordinal: int
    digest: bytes | None  # 16 bytes
    signature: bytes | None  # uint32 per permutation
    bands: bytes | None  # uint64 per band


class DedupStore:
    """The dedup keys of the documents seen so far (kept ones, in order), for batched checks and merges."""

    def __init__(self, path: Path, exact: bool, near_threshold: float, readonly: bool = False):
        self.path, self.exact, self.readonly = Path(path), exact, readonly
        self.hasher = MinHasher(near_threshold) if near_threshold else None
        if readonly:
            try:
                meta = json.loads((self.path / META).read_text())
            except (OSError, ValueError):
                raise DataError(
                    f"{self.path} is missing: the dedup keys of this dataset are gone; prepare it again"
                ) from None
        else:
            shutil.rmtree(self.path, ignore_errors=True)  # what a crashed scan left is not trusted
            self.path.mkdir(parents=True)
            meta = {"kept": 0}
        self.kept = meta["kept"]
        self._synced = 0
        self._digests = ShardedTable(self.path, "exact", EXACT, meta.get("exact"), readonly) if exact else None
        self._bands = ShardedTable(self.path, "band", BAND, meta.get("band"), readonly) if self.hasher else None
        mode = "rb" if readonly else "ab+"
        self._logs = {n: open(self.path / f"{n}.log", mode) for n in ("origins", "digests", "signatures")}

    def check(self, docs: list[Keys]) -> list[str | None]:
        """The dedup stage dropping each document ("dedup_exact" / "dedup_near") or None, as if one at a time."""
        n = len(docs)
        out: list[str | None] = [None] * n
        if n == 0:
            return out
        new_digest = np.zeros(n, bool)
        digests = _digests(docs) if self._digests is not None else None
        if digests is not None:
            stored = self._digests.find(digests)["k"] != 0
            _, first = np.unique(digests.view(np.dtype((np.void, 16))), return_index=True)
            new_digest[first] = True
            new_digest &= ~stored  # an earlier document (stored, or earlier in the batch) had the digest
            for i in np.flatnonzero(~new_digest):
                out[i] = "dedup_exact"
            self._digests.insert(digests[new_digest])
        alive = [i for i in range(n) if out[i] is None]
        kept = alive if self._bands is None else self._near(docs, alive, out)
        self._append(docs, kept)
        return out

    def _near(self, docs: list[Keys], alive: list[int], out: list[str | None]) -> list[int]:
        """Decide near duplicates among the alive documents in order; insert the kept ones' new band keys."""
        assert self._bands is not None and self.hasher is not None
        if not alive:
            return []
        keys = np.frombuffer(b"".join(docs[i].bands or b"" for i in alive), np.uint64).reshape(len(alive), -1)
        keys = np.where(keys == 0, np.uint64(1), keys)  # 0 marks an empty slot
        entries = np.zeros(keys.size, BAND)
        entries["k"] = keys.ravel()
        found = self._bands.find(entries).reshape(keys.shape)
        stored = found["k"] != 0
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        shared = (counts[inverse] > 1).reshape(keys.shape)  # the key recurs in this batch
        quick = ~(stored | shared).any(axis=1)  # nothing to compare with: kept, and its keys are all new
        first_kept: dict[int, int] = {}  # a key shared in the batch -> the first kept document that has it
        kept: list[int] = []
        for j, i in enumerate(alive):
            if not quick[j]:
                if self._near_hit(docs, i, keys[j], found[j], stored[j], shared[j], first_kept):
                    out[i] = "dedup_near"
                    continue
                for b in np.flatnonzero(shared[j] & ~stored[j]):
                    first_kept.setdefault(int(keys[j, b]), i)
            kept.append(i)
        kept_set = set(kept)
        is_kept = np.array([i in kept_set for i in alive], bool)
        new = ~stored & is_kept[:, None]
        # A key recurring in the batch goes in once, for its first kept document (row-major order is doc order).
        recurring = np.flatnonzero((new & shared).ravel())
        _, first = np.unique(keys.ravel()[recurring], return_index=True)
        new &= ~shared
        new.ravel()[recurring[first]] = True
        add = np.zeros(int(new.sum()), BAND)
        add["k"] = keys[new]
        add["v"] = (self.kept + np.cumsum(is_kept) - 1)[:, None].repeat(keys.shape[1], axis=1)[new]
        self._bands.insert(add)
        return kept

    def _near_hit(
        self,
        docs: list[Keys],
        i: int,
        keys: np.ndarray,
        found: np.ndarray,
        stored: np.ndarray,
        shared: np.ndarray,
        first_kept: dict[int, int],
    ) -> bool:
        """True if the first kept document with one of the document's band keys has a similar signature."""
        assert self.hasher is not None
        signature = docs[i].signature or b""
        for b in range(len(keys)):
            if stored[b]:
                other = self.signature(int(found["v"][b]))
            elif shared[b] and int(keys[b]) in first_kept:
                other = docs[first_kept[int(keys[b])]].signature or b""
            else:
                continue
            if self.hasher.similar(other, signature):
                return True
        return False

    def signature(self, row: int) -> bytes:
        """The signature of the row-th kept document."""
        f = self._logs["signatures"]
        f.flush()
        size = self.hasher.signature_bytes if self.hasher else 0
        f.seek(row * size)
        return f.read(size)

    def _append(self, docs: list[Keys], kept: list[int]) -> None:
        if self.kept + len(kept) > MAX_KEPT:
            raise DataError(f"{self.path}: more than {MAX_KEPT} kept documents in one store; prepare in --shard parts")
        self.kept += len(kept)
        self._logs["origins"].write(np.array([(docs[i].file, docs[i].ordinal) for i in kept], np.int64).tobytes())
        if self._digests is not None:
            self._logs["digests"].write(b"".join(docs[i].digest or b"" for i in kept))
        if self._bands is not None:
            self._logs["signatures"].write(b"".join(docs[i].signature or b"" for i in kept))
        written = self.kept * (16 + 16 * self.exact + (self.hasher.signature_bytes if self.hasher else 0))
        if written // SYNC_BYTES != self._synced:
            # Written out now, the logs' pages stay cached but clean: the kernel's background writeback is not
            # set off by them, and so does not keep writing back (and write-protecting) the tables' pages.
            self._synced = written // SYNC_BYTES
            for f in self._logs.values():
                f.flush()
                os.fdatasync(f.fileno())

    def exact_duplicates(self, docs: list[Keys]) -> list[bool]:
        """Which of these documents (of another store) have a digest this store holds; the store is unchanged."""
        if self._digests is None or not docs:
            return [False] * len(docs)
        return (self._digests.find(_digests(docs))["k"] != 0).tolist()

    def near_duplicates(self, docs: list[Keys]) -> list[bool]:
        """Which of these documents (of another store) are similar to a kept one here sharing a band key."""
        if self._bands is None or self.hasher is None or not docs:
            return [False] * len(docs)
        keys = np.frombuffer(b"".join(d.bands or b"" for d in docs), np.uint64)
        entries = np.zeros(len(keys), BAND)
        entries["k"] = np.where(keys == 0, np.uint64(1), keys)
        found = self._bands.find(entries).reshape(len(docs), -1)
        return [
            any(self.hasher.similar(self.signature(int(r)), d.signature or b"") for r in row["v"][row["k"] != 0])
            for d, row in zip(docs, found, strict=True)
        ]

    def kept_documents(self, batch: int = 1 << 16) -> Iterator[list[Keys]]:
        """The kept documents' keys (band keys recomputed from the signatures), in order, a batch at a time."""
        size = self.hasher.signature_bytes if self.hasher else 0
        for lo in range(0, self.kept, batch):
            n = min(batch, self.kept - lo)
            origins = _read(self._logs["origins"], lo * 16, n * 16)
            digests = _read(self._logs["digests"], lo * 16, n * 16) if self.exact else b""
            signatures = _read(self._logs["signatures"], lo * size, n * size) if self.hasher else b""
            pairs = np.frombuffer(origins, np.int64).reshape(-1, 2).tolist()
            yield [
                Keys(
                    f,
                    o,
                    digests[16 * k : 16 * k + 16] if self.exact else None,
                    signatures[size * k : size * (k + 1)] if self.hasher else None,
                    self.hasher.band_hashes(signatures[size * k : size * (k + 1)]) if self.hasher else None,
                )
                for k, (f, o) in enumerate(pairs)
            ]

    def bytes_on_disk(self) -> int:
        """The store's size on disk (tables and logs)."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def close(self) -> None:
        """Write everything back, fsync it, and record the tables' state: a journal naming the store can trust it."""
        for f in self._logs.values():
            if not self.readonly:
                f.flush()
                fsync_path(Path(f.name))
            f.close()
        for table in (self._digests, self._bands):
            if table is not None:
                table.close()
        if not self.readonly:
            meta: dict = {"kept": self.kept}
            if self._digests is not None:
                meta["exact"] = self._digests.state()
            if self._bands is not None:
                meta["band"] = self._bands.state()
            atomic_write_json(self.path / META, meta)


def _digests(docs: list[Keys]) -> np.ndarray:
    raw = np.frombuffer(b"".join(d.digest or b"" for d in docs), np.uint64).reshape(len(docs), 2)
    entries = np.zeros(len(docs), EXACT)
    entries["k"] = np.where(raw[:, 0] == 0, np.uint64(1), raw[:, 0])  # 0 marks an empty slot
    entries["k2"] = raw[:, 1]
    return entries


def _read(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)
