"""Which documents dedup drops, decided from keys sorted on disk after the scan, exactly as in order one at a time.

The rules (keel.data.dedup_store) are sequential: a document is an exact duplicate if an earlier document had its
digest, and a near duplicate if one of its band keys is a band key of an earlier *kept* document. Exact duplicates are
the non-first members of each digest's group. Near duplicates depend on which earlier documents were kept, but only
through band keys that two or more documents share: those (document, shared key) pairs, gathered partition by
partition, are then walked in document order once, with one bit a shared key for "a kept document holds it". Every
step reads partitions sequentially and holds one partition's records at a time; verdicts go to a byte a document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from keel.data.partitions import Partitions, grouped
from keel.data.progress import PassProgress

KEPT, EXACT, NEAR = 0, 1, 2  # a document's verdict
DIGEST_ROW = np.dtype([("k", "<u8"), ("k2", "<u8"), ("seq", "<u4")])  # seq: the document's number in the scan
BAND_ROW = np.dtype([("k", "<u8"), ("seq", "<u4")])
# (document, shared key): "k" is the document's number spread over 64 bits (seq * step), so the pairs scatter into
# partitions in document order.
PAIR = np.dtype([("k", "<u8"), ("key", "<u8")])
BUDGET = 64 << 20  # bytes of one partition's records held at once


def mark_exact(digests: Partitions, verdicts: np.ndarray, log: Callable[[str], None]) -> None:
    """Mark EXACT every document whose digest an earlier document had."""
    for part in _each(digests, "dedup, exact", log):
        order, starts = grouped(part["k"])
        sizes = np.diff(np.append(starts, len(order)))
        repeated = part[order[np.repeat(sizes > 1, sizes)]]  # same first 64 bits: few, so sorted in full
        repeated = repeated[np.lexsort((repeated["seq"], repeated["k2"], repeated["k"]))]
        same = (repeated["k"][1:] == repeated["k"][:-1]) & (repeated["k2"][1:] == repeated["k2"][:-1])
        verdicts[repeated["seq"][1:][same]] = EXACT


def mark_near(bands: Partitions, verdicts: np.ndarray, work: Path, log: Callable[[str], None]) -> None:
    """Mark NEAR every document (not EXACT) sharing a band key with an earlier document kept."""
    step = np.uint64((2**64 - 1) // max(len(verdicts), 1))
    pairs = Partitions(work, PAIR)
    shared = 0  # shared keys numbered so far, across partitions
    for part in _each(bands, "dedup, near: band keys", log):
        part = part[verdicts[part["seq"]] == KEPT]  # an exact duplicate holds no keys
        order, starts = grouped(part["k"])
        sizes = np.diff(np.append(starts, len(order)))
        many = sizes > 1
        member = np.repeat(many, sizes)
        out = np.zeros(int(member.sum()), PAIR)
        out["k"] = part["seq"][order[member]].astype(np.uint64) * step
        out["key"] = np.repeat(shared + np.arange(int(many.sum()), dtype=np.uint64), sizes[many])
        pairs.add(out)
        shared += int(many.sum())
    held = bytearray(shared)  # a kept document holds the key
    for part in _each(pairs, "dedup, near: shared keys in document order", log):
        part = part[np.argsort(part["k"])]
        first = np.flatnonzero(np.concatenate([[True], part["k"][1:] != part["k"][:-1]]))
        docs, keys, bounds = part["k"][first], part["key"].tolist(), [*first.tolist(), len(part)]
        near = []
        for i in range(len(docs)):
            mine = keys[bounds[i] : bounds[i + 1]]
            if any(held[key] for key in mine):
                near.append(i)
            else:
                for key in mine:
                    held[key] = 1
        verdicts[(docs[near] // step).astype(np.int64)] = NEAR
    pairs.delete()


def _each(parts: Partitions, phase: str, log: Callable[[str], None]) -> Iterator[np.ndarray]:
    """The partitions' records (parts.each), saying every so often how many MB of them are done."""
    progress, done, partitions = PassProgress(phase, [parts.size()], log, unit="MB of keys"), 0, 0
    for part in parts.each(BUDGET):
        yield part
        done, partitions = done + part.nbytes, partitions + 1
        progress.update(0, done, lambda n=partitions: f"{n:,} partitions sorted")
