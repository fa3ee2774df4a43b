"""The scan's lists of dropped documents, so the write pass skips them without redoing the work.

Two lists, each sorted: the filters' and tombstones' (DROPS, written as the scan reads) and dedup's (DEDUP_DROPS,
written once the scan has read everything and dedup has decided).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from keel.errors import DataError

DROPS = "dropped.bin"  # int64 keys file << 32 | ordinal, in document order (so sorted), native byte order
DEDUP_DROPS = "dropped-dedup.bin"  # the same, for the documents dedup dropped
_ORDINALS = 1 << 32
_BUFFER = 1 << 16  # keys held before a write: bounded memory for any number of drops


def drop_key(file: int, ordinal: int) -> int:
    """One sortable int64 for a document's (file, ordinal)."""
    if ordinal >= _ORDINALS:
        raise DataError(f"source file #{file} holds more than {_ORDINALS - 1} records; split it into several files")
    return file * _ORDINALS + ordinal


class DropWriter:
    """Appends the dropped documents' keys during the scan; close() makes them durable."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._keys: list[int] = []

    def add(self, file: int, ordinal: int) -> None:
        """Record one dropped document (calls come in document order)."""
        self._keys.append(drop_key(file, ordinal))
        if len(self._keys) >= _BUFFER:
            self._flush()

    def add_many(self, files: np.ndarray, ordinals: np.ndarray) -> None:
        """Record dropped documents given as arrays, in document order."""
        if len(ordinals) and int(ordinals.max()) >= _ORDINALS:
            drop_key(0, int(ordinals.max()))  # the one-line error
        self._flush()
        self._file.write((files.astype(np.int64) * _ORDINALS + ordinals).astype(np.int64).tobytes())

    def _flush(self) -> None:
        self._file.write(np.array(self._keys, dtype=np.int64).tobytes())
        self._keys.clear()

    def close(self) -> None:
        """Write what is buffered and fsync: the progress file that follows vouches for it."""
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def dropped_in(path: Path, file: int, first: int, last: int) -> set[int]:
    """The dropped ordinals of one file between first and last (inclusive), from both sorted lists beside `path`."""
    out: set[int] = set()
    for name in (DROPS, DEDUP_DROPS):
        listed = path.with_name(name)
        if not listed.exists() or os.path.getsize(listed) == 0:
            continue
        keys = np.memmap(listed, dtype=np.int64, mode="r")
        lo = int(np.searchsorted(keys, drop_key(file, first), side="left"))
        hi = int(np.searchsorted(keys, drop_key(file, last), side="right"))
        out.update((keys[lo:hi] - file * _ORDINALS).tolist())
    return out
