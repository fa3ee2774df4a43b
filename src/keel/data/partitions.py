"""Records scattered into files by the top bits of their 64-bit field "k", read back one partition at a time.

What a corpus-wide sort would hold in memory at once, a partition holds a slice of: every record with a given "k" lands
in the same partition, so each is grouped alone. Appends wait in RAM and go out a partition's run at a time
(sequential writes, each page dirtied once); a partition larger than the reader's budget is scattered again by the next
bits of "k" when it is read, so memory stays bounded whatever the corpus's size.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BITS = 8  # 256 partitions a level
BUFFER_BYTES = 8 << 20  # records held in RAM before they are written out: 32 KB a partition file a write


class Partitions:
    """Records of a structured dtype with a uint64 field "k", in 2**BITS files under `directory`."""

    def __init__(self, directory: Path, dtype: np.dtype, used: int = 0):
        self.directory, self.dtype, self.used = Path(directory), np.dtype(dtype), used  # used: top bits already split
        self.directory.mkdir(parents=True, exist_ok=True)
        self._waiting: list[np.ndarray] = []
        self._bytes = 0

    def add(self, records: np.ndarray) -> None:
        """Append records (copied: the caller may reuse its array)."""
        if len(records):
            self._waiting.append(np.array(records, self.dtype))
            self._bytes += records.nbytes
            if self._bytes >= BUFFER_BYTES:
                self.flush()

    def flush(self) -> None:
        """Write what waits in RAM to the partitions' files."""
        if not self._waiting:
            return
        records = np.concatenate(self._waiting)
        self._waiting, self._bytes = [], 0
        part = self._part(records["k"])
        order = np.argsort(part, kind="stable")  # radix sort on small integers: one linear pass
        bounds = np.searchsorted(part[order], np.arange((1 << BITS) + 1))
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            with open(self._path(p), "ab") as f:
                f.write(records[order[bounds[p] : bounds[p + 1]]].tobytes())

    def files(self) -> list[Path]:
        """The partitions' files, in order of "k"'s top bits (what waits in RAM is written first)."""
        self.flush()
        return [path for p in range(1 << BITS) if (path := self._path(p)).exists()]

    def each(self, budget: int) -> Iterator[np.ndarray]:
        """Every partition's records in order of "k"'s top bits (read_partition: each file deleted once read)."""
        for path in self.files():
            yield from read_partition(path, self.dtype, self.used + BITS, budget)

    def size(self) -> int:
        """Bytes of records, written or waiting."""
        return self._bytes + sum(p.stat().st_size for p in self.directory.rglob("*.bin"))

    def delete(self) -> None:
        """Drop the records, written or waiting."""
        self._waiting, self._bytes = [], 0
        shutil.rmtree(self.directory, ignore_errors=True)

    def _part(self, keys: np.ndarray) -> np.ndarray:
        return ((keys << np.uint64(self.used)) >> np.uint64(64 - BITS)).astype(np.int64)

    def _path(self, p: int) -> Path:
        return self.directory / f"{p:03d}.bin"


def read_partition(path: Path, dtype: np.dtype, used: int, budget: int) -> Iterator[np.ndarray]:
    """A partition file's records, deleted once read: at once if they fit in `budget` bytes (or share all 64 bits of
    "k", `used` of which the partitions above split on), else scattered by the next bits of "k" and read part by part.
    """
    if path.stat().st_size <= budget or used + BITS > 64:
        records = np.fromfile(path, dtype)
        path.unlink()
        yield records
        return
    finer = Partitions(path.with_suffix(""), dtype, used)
    for chunk in chunks(path, dtype, max(budget // dtype.itemsize, 1)):
        finer.add(chunk)
    yield from finer.each(budget)
    finer.delete()


def chunks(path: Path, dtype: np.dtype, count: int = 1 << 20) -> Iterator[np.ndarray]:
    """A file of records, `count` at a time; the file is deleted once read."""
    with open(path, "rb") as f:
        while len(chunk := np.fromfile(f, dtype, count)):
            yield chunk
    path.unlink()


def grouped(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An order that brings equal keys together, and the size of each group of equal keys in it, in order.

    The keys are first split by their low byte (a linear radix pass), then each part is sorted alone: sorts that fit in
    the CPU's caches are about 1.5 times as fast per key as one large sort, and grouping needs no order across parts.
    """
    low = (keys & np.uint64(0xFF)).astype(np.uint8)
    order = np.argsort(low, kind="stable")
    bounds = np.searchsorted(low[order], np.arange(257)).tolist()
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi - lo > 1:
            part = order[lo:hi]
            order[lo:hi] = part[np.argsort(keys[part])]
    ordered = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(keys) else np.zeros(0, int)
    return order, np.diff(np.append(starts, len(keys)))
