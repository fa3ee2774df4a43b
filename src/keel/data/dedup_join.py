"""Duplicates across the parts of a merge, found by joining the parts' dedup logs (sort-based, as datatrove does).

Each part's keys (digests with the kept documents' rows, band keys with their rows) are scattered into partitions by
their top bits, files in a work directory, so that one partition of every part fits in memory; then, partition by
partition and part by part in merge order, numpy set operations find a later part's kept documents whose digest
(exact) or one of whose band keys (near) an earlier part holds. No part's store is filled again.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from keel.data.dedup_store import DedupStore

PARTITION_BYTES = 64 << 20  # the keys of all parts in one partition: what the join holds in memory at once
DIGEST_ROW = np.dtype([("k", "<u8"), ("k2", "<u8"), ("row", "<i8")])  # row -1: a document near dedup dropped
BAND_ROW = np.dtype([("k", "<u8"), ("row", "<i8")])


def duplicates_across(stores: list[DedupStore], work: Path) -> list[dict[int, str]]:
    """For each part, its kept rows that duplicate an earlier part's document: row -> "dedup_exact" / "dedup_near"."""
    total = sum(s.kept * (24 + 16 * s.bands) for s in stores)
    bits = max(0, math.ceil(math.log2(max(total, 1) / PARTITION_BYTES)))
    work.mkdir(parents=True, exist_ok=True)
    for q, store in enumerate(stores):
        _scatter(store, work / str(q), bits)
    found: list[dict[int, str]] = [{} for _ in stores]
    for p in range(1 << bits):
        seen_digests, seen_bands = np.zeros(0, np.dtype((np.void, 16))), np.zeros(0, np.uint64)
        for q in range(len(stores)):
            digests = _load(work / str(q) / f"d{p}.bin", DIGEST_ROW)
            keys = np.stack([digests["k"], digests["k2"]], axis=1).view(np.dtype((np.void, 16))).ravel()
            bands = _load(work / str(q) / f"b{p}.bin", BAND_ROW)
            for row in digests["row"][np.isin(keys, seen_digests) & (digests["row"] >= 0)].tolist():
                found[q][row] = "dedup_exact"  # exact first, as prepare decides
            for row in bands["row"][np.isin(bands["k"], seen_bands)].tolist():
                found[q].setdefault(row, "dedup_near")
            seen_digests, seen_bands = np.union1d(seen_digests, keys), np.union1d(seen_bands, bands["k"])
    return found


def _scatter(store: DedupStore, out: Path, bits: int) -> None:
    """Append the store's digests and band keys, with their rows, to the partition files of their top bits."""
    out.mkdir()
    for kept in store.kept_batches():
        if kept.digests is not None:
            _append(out, "d", bits, _with_rows(kept.digests, kept.rows))
        if kept.bands is not None:
            entries = np.zeros(kept.bands.size, BAND_ROW)
            entries["k"], entries["row"] = kept.bands.ravel(), np.repeat(kept.rows, kept.bands.shape[1])
            _append(out, "b", bits, entries)
    for digests in store.near_digests():
        _append(out, "d", bits, _with_rows(digests, np.full(len(digests), -1)))


def _with_rows(digests: np.ndarray, rows: np.ndarray) -> np.ndarray:
    entries = np.zeros(len(digests), DIGEST_ROW)
    entries["k"], entries["k2"], entries["row"] = digests["k"], digests["k2"], rows
    return entries


def _append(out: Path, kind: str, bits: int, entries: np.ndarray) -> None:
    part = entries["k"] >> np.uint64(64 - bits) if bits else np.zeros(len(entries), np.uint64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange((1 << bits) + 1, dtype=np.uint64))
    for p in np.flatnonzero(np.diff(bounds)).tolist():
        with open(out / f"{kind}{p}.bin", "ab") as f:
            f.write(entries[order[bounds[p] : bounds[p + 1]]].tobytes())


def _load(path: Path, dtype: np.dtype) -> np.ndarray:
    return np.fromfile(path, dtype) if path.exists() else np.zeros(0, dtype)
