"""Hash tables of 64-bit keys in memory-mapped files, sharded by key and worked on a batch at a time with numpy.

Why not sqlite: one row at a time from Python, and a B-tree whose random inserts slow down as it outgrows its
cache. Here a batch of keys is looked up or inserted with a few array operations per probe round (open
addressing, linear probing), an operation costs about the same however full the table is (each shard doubles
before it is 40-77% full), and the process's own memory is bounded: a batch and a fixed-size table of new
entries per shard; the tables are file pages that the kernel caches and writes back. Doubling a shard
streams its old file into the new one in bounded chunks, placing the entries without probing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

SHARD_BITS = 4  # 16 shards per table by default: a doubling moves 1/16 of it, and a batch costs 16 numpy passes
FIRST_SLOTS = 1 << 12
# Shard s of n doubles when it is LOAD * 2 ** (s / n) full (0.40-0.77 with 16): as the entries double, the shards
# double one at a time, evenly spaced, so no stretch of documents pays for several doublings at once.
LOAD = 0.4
_SCALAR = 16  # placing fewer entries than this goes on in Python: numpy calls cost more than they do
_WINDOW = 8  # slots a lookup reads per round after its home slot: a 64-byte line of 8-byte entries
PENDING_SLOTS = 1 << 18  # per shard: new entries wait in RAM (an in-memory table) and go to the file together
_CHUNK = 1 << 20  # slots per step when a shard doubles


class ShardedTable:
    """Entries with a uint64 field "k" (0 marks an empty slot, so keys are never 0), in 2**shard_bits files."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype, shard_bits: int = SHARD_BITS):
        self.directory, self.name, self.dtype = Path(directory), name, np.dtype(dtype)
        self.shard_bits = shard_bits
        shards = 1 << shard_bits
        self.slots: list[int] = [FIRST_SLOTS] * shards
        self.counts: list[int] = [0] * shards
        self._maps: list[np.memmap | None] = [None] * shards
        self._arrays: list[np.ndarray | None] = [None] * shards  # the same memory without memmap's per-call cost
        # Random single writes into file pages make the kernel's writeback fight the inserts (a page being written
        # back is write-protected and faults again); written together, in slot order, each page is dirtied once.
        self._pending = [np.zeros(0, self.dtype)] * shards
        self._pending_counts = [0] * shards

    def find(self, entries: np.ndarray) -> np.ndarray:
        """The stored entry equal to each entry on every key field ("k", and "k2" if the dtype has it), or zeros."""
        out = np.zeros(len(entries), self.dtype)
        for shard, index in self._by_shard(entries):
            found = _probe(self._pending[shard], entries[index]) if self._pending_counts[shard] else None
            if found is None or not (found["k"] != 0).all():
                on_disk = _probe(self._map(shard), entries[index])
                found = on_disk if found is None else np.where(found["k"] != 0, found, on_disk)
            out[index] = found
        return out

    def insert(self, entries: np.ndarray) -> None:
        """Add entries whose keys are distinct and not in the table yet."""
        for shard, index in self._by_shard(entries):
            # Shard s of n flushes when its pending table is (1 + s / n) / 4 full: the shards fill alike, and flushing
            # at different counts keeps their flushes (and the doublings they set off) from coming all at once.
            if self._pending_counts[shard] + len(index) > PENDING_SLOTS * (1 + shard / (1 << self.shard_bits)) / 4:
                self._flush(shard)
            if not len(self._pending[shard]):
                # A power of two: probing wraps around with a mask.
                self._pending[shard] = np.zeros(max(PENDING_SLOTS, 1 << (2 * len(index)).bit_length()), self.dtype)
            _place(self._pending[shard], entries[index])
            self._pending_counts[shard] += len(index)

    def _flush(self, shard: int) -> None:
        """Move a shard's pending entries into its file, in slot order."""
        pending = self._pending[shard]
        entries = pending[np.flatnonzero(pending["k"] != 0)]
        load = LOAD * 2 ** (shard / (1 << self.shard_bits))
        while self.counts[shard] + len(entries) > load * self.slots[shard]:
            self._grow(shard)
        entries = entries[np.argsort(entries["k"] & np.uint64(self.slots[shard] - 1))]
        _place(self._map(shard), entries)
        self.counts[shard] += len(entries)
        self._pending[shard], self._pending_counts[shard] = np.zeros(0, self.dtype), 0

    def delete(self) -> None:
        """Drop the table: its pending entries and its files."""
        self._maps = [None] * len(self._maps)
        self._arrays = [None] * len(self._arrays)
        self._pending = [np.zeros(0, self.dtype)] * len(self._pending)
        for shard in range(1 << self.shard_bits):
            self._path(shard).unlink(missing_ok=True)

    def _by_shard(self, entries: np.ndarray) -> list[tuple[int, np.ndarray]]:
        shard = (entries["k"] >> np.uint64(64 - self.shard_bits)).astype(np.int64)
        order = np.argsort(shard, kind="stable")
        shards = 1 << self.shard_bits
        bounds = np.searchsorted(shard[order], np.arange(shards + 1))
        return [(s, order[bounds[s] : bounds[s + 1]]) for s in range(shards) if bounds[s] < bounds[s + 1]]

    def _path(self, shard: int) -> Path:
        return self.directory / f"{self.name}-{shard:02d}.bin"

    def _map(self, shard: int) -> np.ndarray:
        array = self._arrays[shard]
        if array is None:
            path = self._path(shard)
            if not path.exists():
                with open(path, "wb") as f:
                    # Allocated, not sparse: a store into a sparse page the disk has no room for kills the process
                    # with SIGBUS, where allocating up front is an OSError that prepare reports in one line.
                    os.posix_fallocate(f.fileno(), 0, self.slots[shard] * self.dtype.itemsize)
            table = _mapped(path, self.dtype, self.slots[shard])
            self._maps[shard], self._arrays[shard] = table, array = table, table.view(np.ndarray)
        return array

    def _grow(self, shard: int) -> None:
        old, path = self._map(shard), self._path(shard)
        new_slots = 2 * self.slots[shard]
        tmp = path.with_name(path.name + ".grow")
        with open(tmp, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, new_slots * self.dtype.itemsize)
        new = _mapped(tmp, self.dtype, new_slots)
        _double(old, new.view(np.ndarray))
        # Not written back here: the tables are rebuilt after a crash, and clean pages would fault on their next write.
        del old
        os.replace(tmp, path)
        # The map stays on the file under its new name: mapped again, each page would fault once more.
        self._maps[shard], self._arrays[shard] = new, new.view(np.ndarray)
        self.slots[shard] = new_slots


def _mapped(path: Path, dtype: np.dtype, slots: int) -> np.memmap:
    """A table file mapped for random access, asking for 2 MB pages where the kernel maps file pages that way.

    Lookups land anywhere in gigabytes of table: with 4 KB pages nearly each one misses the TLB, and once the kernel
    writes the tables back, each page's next write faults again. Linux 6.x maps large ext4/xfs folios with huge
    pages when asked (10 M documents: the last tenth 1.1x as fast); elsewhere the advice is ignored.
    """
    table = np.memmap(path, dtype, mode="r+", shape=(slots,))
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages refuses the advice
            table._mmap.madvise(advice)
    return table


def _double(old: np.ndarray, new: np.ndarray) -> None:
    """Copy a table into an empty one twice its size in one forward pass, without probing.

    An entry whose slot is h in the old table goes home to h or h + len(old). Taken between empty old slots (no
    entry's probe run crosses one) and sorted by new home, each half's entries are placed as linear probing would,
    all at once: slot i = max(home i, slot i-1 + 1). The few whose run would wrap (the old table's first run, and
    any run past the end of a half) are placed last by probing.
    """
    half, keys = len(old), old["k"]
    raw, new_raw = _plain(old), _plain(new)  # the same bytes as one plain field: copies cost less
    start = int(np.argmax(keys == 0))  # an empty slot: the runs after it do not wrap
    later = [raw[np.flatnonzero(keys[:start] != 0)]]
    last = [-1, half - 1]  # the slot each half's previous entry took
    lo = start
    while lo < half:
        hi = min(lo + _CHUNK, half)
        while hi < half:
            empty = _last_empty(keys, lo, hi)
            if empty >= 0:
                hi = empty + 1  # the chunk ends at an empty slot
                break
            hi = min(hi + _CHUNK, half)
        used = lo + np.flatnonzero(keys[lo:hi] != 0)  # an index: numpy gathers faster than it masks
        homes = (keys[used] & np.uint64(2 * half - 1)).astype(np.int64)
        split = homes >= half
        order = np.concatenate([np.flatnonzero(~split), np.flatnonzero(split)])  # the lower half's entries first
        # Each half's homes are nearly sorted already (slot order): a timsort pass.
        order = order[np.argsort(homes[order], kind="stable")]
        moved, homes, lower = raw[used[order]], homes[order], len(split) - int(np.count_nonzero(split))
        for side, part in ((0, slice(0, lower)), (1, slice(lower, len(homes)))):
            h = homes[part]
            if not len(h):
                continue
            step = np.arange(len(h))
            slots = np.maximum(np.maximum.accumulate(h - step), last[side] + 1) + step
            last[side] = int(slots[-1])
            fits = int(np.searchsorted(slots, half * (side + 1)))  # slots rise: those past the half's end wrap
            new_raw[slots[:fits]] = moved[part][:fits]
            later.append(moved[part][fits:])
        lo = hi
    _place(new, np.concatenate(later).view(new.dtype))


def _last_empty(keys: np.ndarray, lo: int, hi: int) -> int:
    """The last empty slot in keys[lo:hi], or -1: looked for from the end, where one is almost always near."""
    end, width = hi, 64
    while end > lo:
        begin = max(lo, end - width)
        empty = np.flatnonzero(keys[begin:end] == 0)
        if empty.size:
            return begin + int(empty[-1])
        end, width = begin, 8 * width
    return -1


def _plain(table: np.ndarray) -> np.ndarray:
    """A table's entries viewed as one unsigned integer or opaque field of the same size."""
    size = table.dtype.itemsize
    return table.view(np.uint64 if size == 8 else np.dtype(f"V{size}"))


def _probe(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The entry of `table` equal to each key on every key field ("k", and "k2" if present), or zeros.

    The first round reads each key's home slot, where most lookups end. The others read a window of _WINDOW slots'
    "k" per round and stop at the first slot equal to the key or empty, as probing one slot at a time would: a
    batch costs a few numpy passes rather than one per slot of its longest run.
    """
    mask, table_k, k = len(table) - 1, table["k"], keys["k"]
    pos = (k & np.uint64(mask)).astype(np.int64)
    pair = "k2" in table.dtype.names
    slot = table[pos]
    hit = (slot["k"] == k) & (slot["k2"] == keys["k2"]) if pair else slot["k"] == k
    out = np.where(hit, slot, np.zeros(1, table.dtype))
    active = np.flatnonzero(~hit & (slot["k"] != 0))
    step = np.arange(1, _WINDOW + 1)
    while len(active):
        slots = (pos[active, None] + step) & mask
        window = table_k[slots]
        hits = window == k[active, None]
        if pair:  # a 64-bit match is a 128-bit one unless the second halves differ
            row, col = np.nonzero(hits)
            differ = table["k2"][slots[row, col]] != keys["k2"][active[row]]
            hits[row[differ], col[differ]] = False
        stop = hits | (window == 0)
        first = stop.argmax(axis=1)
        rows = np.arange(len(active))
        found = np.flatnonzero(hits[rows, first])
        out[active[found]] = table[slots[found, first[found]]]
        active = active[~stop[rows, first]]
        pos[active] += _WINDOW
    return out


def _place(table: np.ndarray, entries: np.ndarray) -> None:
    """Put distinct new entries into free slots by linear probing, all at once: one array pass per probe round."""
    mask = len(table) - 1
    pos = (entries["k"] & np.uint64(mask)).astype(np.int64)
    active = np.arange(len(entries))
    while len(active) >= _SCALAR:
        free = np.flatnonzero(table["k"][pos[active]] == 0)
        # Several entries may want the same free slot: all are written there, one stays (what is read back), and
        # the others probe on. A sort to pick the first of each would cost more than the extra writes.
        wanted, candidates = pos[active[free]], entries[active[free]]
        table[wanted] = candidates
        placed = np.zeros(len(active), bool)
        placed[free[table[wanted] == candidates]] = True
        active = active[~placed]
        pos[active] = (pos[active] + 1) & mask
    for i in active.tolist():
        p = int(pos[i])
        while table["k"][p] != 0:
            p = (p + 1) & mask
        table[p] = entries[i]
