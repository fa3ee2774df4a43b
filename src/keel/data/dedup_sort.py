"""Which documents dedup drops, decided from keys sorted on disk after the scan, exactly as in order one at a time.

The rules (keel.data.dedup_store) are sequential: a document is an exact duplicate if an earlier document had its
digest, and a near duplicate if one of its band keys is a band key of an earlier *kept* document. Exact duplicates are
the non-first members of each digest's group. Near duplicates depend on which earlier documents were kept, but only
through band keys that two or more documents share: those (document, shared key) pairs, gathered partition by
partition, are then walked in document order once, with one bit a shared key for "a kept document holds it". Every
step reads partitions sequentially and holds one partition's records at a time; verdicts go to a byte a document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from keel.data.partitions import BITS, Partitions, grouped, read_partition
from keel.data.progress import PassProgress

KEPT, EXACT, NEAR = 0, 1, 2  # a document's verdict
DIGEST_ROW = np.dtype([("k", "<u8"), ("k2", "<u8"), ("seq", "<u4")])  # seq: the document's number in the scan
BAND_ROW = np.dtype([("k", "<u8"), ("seq", "<u4")])
# (document, shared key): "k" is the document's number spread over 64 bits (seq * step), so the pairs scatter into
# partitions in document order.
PAIR = np.dtype([("k", "<u8"), ("key", "<u8")])
BUDGET = 128 << 20  # bytes of partition records held at once, in all the processes that sort them


Each = Callable[[Callable, Iterable], Iterator]  # map, or a process pool's: results in the items' order


def mark_exact(digests: Partitions, verdicts: np.memmap, log: Callable[[str], None], each: Each, budget: int) -> None:
    """Mark EXACT every document whose digest an earlier document had (the partitions sorted through `each`)."""
    for repeats in _through(each, partial(exact_repeats, budget=budget), digests, "dedup, exact", log):
        verdicts[repeats] = EXACT


def exact_repeats(path: Path, budget: int) -> np.ndarray:
    """The scan numbers of the documents of one digest partition whose digest an earlier document had."""
    found = [np.zeros(0, np.uint32)]
    for part in read_partition(path, DIGEST_ROW, BITS, budget):
        order, starts = grouped(part["k"])
        sizes = np.diff(np.append(starts, len(order)))
        repeated = part[order[np.repeat(sizes > 1, sizes)]]  # same first 64 bits: few, so sorted in full
        repeated = repeated[np.lexsort((repeated["seq"], repeated["k2"], repeated["k"]))]
        same = (repeated["k"][1:] == repeated["k"][:-1]) & (repeated["k2"][1:] == repeated["k2"][:-1])
        found.append(repeated["seq"][1:][same])
    return np.concatenate(found)


def mark_near(
    bands: Partitions, verdicts: np.memmap, work: Path, log: Callable[[str], None], each: Each, budget: int
) -> None:
    """Mark NEAR every document (not EXACT) sharing a band key with an earlier document kept."""
    step = np.uint64((2**64 - 1) // max(len(verdicts), 1))
    pairs = Partitions(work, PAIR)
    shared = 0  # shared keys numbered so far, across partitions
    holders = partial(shared_keys, budget=budget, verdicts=Path(verdicts.filename))
    for seqs, keys, count in _through(each, holders, bands, "dedup, near: band keys", log):
        out = np.zeros(len(seqs), PAIR)
        out["k"], out["key"] = seqs.astype(np.uint64) * step, keys + np.uint64(shared)
        pairs.add(out)
        shared += count
    held = bytearray(shared)  # a kept document holds the key
    for part in pairs.each(budget):  # in document order
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


def shared_keys(path: Path, budget: int, verdicts: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Of one band-key partition, the (document, key) pairs of every key two or more documents hold (exact
    duplicates hold none), the keys numbered from 0 in this partition; and how many keys that is."""
    decided = np.memmap(verdicts, np.uint8, "r")  # the exact verdicts, written by the main process
    seqs, keys, count = [np.zeros(0, np.uint32)], [np.zeros(0, np.uint64)], 0
    for part in read_partition(path, BAND_ROW, BITS, budget):
        part = part[decided[part["seq"]] == KEPT]
        order, starts = grouped(part["k"])
        sizes = np.diff(np.append(starts, len(order)))
        many = sizes > 1
        seqs.append(part["seq"][order[np.repeat(many, sizes)]])
        keys.append(np.repeat(count + np.arange(int(many.sum()), dtype=np.uint64), sizes[many]))
        count += int(many.sum())
    return np.concatenate(seqs), np.concatenate(keys), count


def _through(each: Each, work: Callable, parts: Partitions, phase: str, log: Callable[[str], None]) -> Iterator:
    """`work` on each partition file through `each`, saying every so often how many MB of keys are done."""
    files = parts.files()
    sizes = [path.stat().st_size for path in files]
    progress, done = PassProgress(phase, [sum(sizes)], log, unit="MB of keys"), 0
    for n, (result, size) in enumerate(zip(each(work, files), sizes, strict=True), 1):
        yield result
        done += size
        progress.update(0, done, lambda n=n: f"{n:,} of {len(files):,} partitions sorted")
