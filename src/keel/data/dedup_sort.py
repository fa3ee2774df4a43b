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

from keel.data.partitions import BITS, Partitions, chunks, grouped, read_partition
from keel.data.progress import PassProgress

KEPT, EXACT, NEAR = 0, 1, 2  # a document's verdict
DIGEST_ROW = np.dtype([("k", "<u8"), ("k2", "<u8"), ("seq", "<u4")])  # seq: the document's number in the scan
BAND_ROW = np.dtype([("k", "<u8"), ("seq", "<u4")])
# (document, shared key): "k" is the document's number spread over 64 bits (seq * step), so the pairs scatter into
# partitions in document order.
PAIR = np.dtype([("k", "<u8"), ("key", "<u8")])
LOCAL_PAIR = np.dtype([("seq", "<u4"), ("key", "<u8")])  # a worker's pairs: keys numbered within its partition
BUDGET = 128 << 20  # bytes of partition records held at once, in all the processes that sort them


Each = Callable[[Callable, Iterable], Iterator]  # map, or a process pool's: results in the items' order


def mark_exact(digests: Partitions, verdicts: np.memmap, log: Callable[[str], None], each: Each, budget: int) -> None:
    """Mark EXACT every document whose digest an earlier document had (the partitions sorted through `each`)."""
    for found in _through(each, partial(exact_repeats, budget=budget), digests, "dedup, exact", log):
        for repeats in chunks(found, np.dtype(np.uint32)):
            verdicts[repeats] = EXACT


def exact_repeats(path: Path, budget: int) -> Path:
    """The scan numbers (uint32) of the documents of one digest partition whose digest an earlier document had, in a
    file beside it: what a worker hands back through the pool stays small whatever the partition's size."""
    found = path.with_suffix(".repeats")
    with open(found, "wb") as out:
        for part in read_partition(path, DIGEST_ROW, BITS, budget):
            order, sizes = grouped(part["k"])
            repeated = part[order[np.repeat(sizes > 1, sizes)]]  # same first 64 bits: few, so sorted in full
            repeated = repeated[np.lexsort((repeated["seq"], repeated["k2"], repeated["k"]))]
            same = (repeated["k"][1:] == repeated["k"][:-1]) & (repeated["k2"][1:] == repeated["k2"][:-1])
            out.write(repeated["seq"][1:][same].tobytes())
    return found


def mark_near(
    bands: Partitions, verdicts: np.memmap, work: Path, log: Callable[[str], None], each: Each, budget: int
) -> None:
    """Mark NEAR every document (not EXACT) sharing a band key with an earlier document kept."""
    step = np.uint64((2**64 - 1) // max(len(verdicts), 1))
    pairs = Partitions(work, PAIR)
    shared = 0  # shared keys numbered so far, across partitions
    holders = partial(shared_keys, budget=budget, verdicts=Path(verdicts.filename))
    for found, count in _through(each, holders, bands, "dedup, near: band keys", log):
        for local in chunks(found, LOCAL_PAIR):
            out = np.zeros(len(local), PAIR)
            out["k"], out["key"] = local["seq"].astype(np.uint64) * step, local["key"] + np.uint64(shared)
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


def shared_keys(path: Path, budget: int, verdicts: Path) -> tuple[Path, int]:
    """Of one band-key partition, the (document, key) pairs (LOCAL_PAIR) of every key two or more documents hold
    (exact duplicates hold none), the keys numbered from 0 in this partition, in a file beside it; and how many keys
    that is."""
    decided = np.memmap(verdicts, np.uint8, "r")  # the exact verdicts, written by the main process
    found, count = path.with_suffix(".pairs"), 0
    with open(found, "wb") as out:
        for part in read_partition(path, BAND_ROW, BITS, budget):
            part = part[decided[part["seq"]] == KEPT]
            order, sizes = grouped(part["k"])
            many = sizes > 1
            local = np.zeros(int(sizes[many].sum()), LOCAL_PAIR)
            local["seq"] = part["seq"][order[np.repeat(many, sizes)]]
            local["key"] = np.repeat(count + np.arange(int(many.sum()), dtype=np.uint64), sizes[many])
            out.write(local.tobytes())
            count += int(many.sum())
    return found, count


def _through(each: Each, work: Callable, parts: Partitions, phase: str, log: Callable[[str], None]) -> Iterator:
    """`work` on each partition file through `each`, saying every so often how many MB of keys are done."""
    files = parts.files()
    sizes = [path.stat().st_size for path in files]
    progress, done = PassProgress(phase, [sum(sizes)], log, unit="MB of keys"), 0
    for n, (result, size) in enumerate(zip(each(work, files), sizes, strict=True), 1):
        yield result
        done += size
        progress.update(0, done, lambda n=n: f"{n:,} of {len(files):,} partitions sorted")
