"""Hash tables of 64-bit keys in memory-mapped files, sharded by key and worked on a batch at a time with numpy.

Why not sqlite: one row at a time from Python, and a B-tree whose random inserts slow down as it outgrows its
cache. Here a batch of keys is looked up or inserted with a few array operations per probe round (open
addressing, linear probing), an operation costs about the same however full the table is (each shard doubles
before it is 45-75% full), and the process's own memory is bounded: a batch and a fixed-size table of new
entries per shard; the tables are file pages that the kernel caches and writes back. Doubling a shard
streams its old file into the new one in bounded chunks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARD_BITS = 4  # 16 shards per table: a doubling moves 1/16 of it, and a batch costs at most 16 numpy passes
FIRST_SLOTS = 1 << 12
MAX_LOAD = 0.6  # on average: shard s doubles at 0.45 + 0.3 s / 15, so the shards' doublings come one at a time
_SCALAR = 16  # probing fewer entries than this goes on in Python: numpy calls cost more than they do
PENDING_SLOTS = 1 << 18  # per shard: new entries wait in RAM (an in-memory table) and go to the file together
_CHUNK = 1 << 20  # slots per step when a shard doubles


class ShardedTable:
    """Entries with a uint64 field "k" (0 marks an empty slot, so keys are never 0), in 2**SHARD_BITS files."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = Path(directory), name, np.dtype(dtype)
        shards = 1 << SHARD_BITS
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
            if self._pending_counts[shard] + len(index) > PENDING_SLOTS // 2:
                self._flush(shard)
            if not len(self._pending[shard]):
                # A power of two: probing wraps around with a mask.
                self._pending[shard] = np.zeros(max(PENDING_SLOTS, 1 << (2 * len(index)).bit_length()), self.dtype)
            _place(self._pending[shard], entries[index])
            self._pending_counts[shard] += len(index)

    def _flush(self, shard: int) -> None:
        """Move a shard's pending entries into its file, in slot order."""
        pending = self._pending[shard]
        entries = pending[pending["k"] != 0]
        load = MAX_LOAD - 0.15 + 0.3 * shard / ((1 << SHARD_BITS) - 1)
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
        for shard in range(1 << SHARD_BITS):
            self._path(shard).unlink(missing_ok=True)

    def _by_shard(self, entries: np.ndarray) -> list[tuple[int, np.ndarray]]:
        shard = (entries["k"] >> np.uint64(64 - SHARD_BITS)).astype(np.int64)
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange((1 << SHARD_BITS) + 1))
        return [(s, order[bounds[s] : bounds[s + 1]]) for s in range(1 << SHARD_BITS) if bounds[s] < bounds[s + 1]]

    def _path(self, shard: int) -> Path:
        return self.directory / f"{self.name}-{shard:02d}.bin"

    def _map(self, shard: int) -> np.ndarray:
        array = self._arrays[shard]
        if array is None:
            path = self._path(shard)
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(self.slots[shard] * self.dtype.itemsize)  # a sparse file of empty slots
            table = np.memmap(path, self.dtype, mode="r+", shape=(self.slots[shard],))
            self._maps[shard], self._arrays[shard] = table, array = table, table.view(np.ndarray)
        return array

    def _grow(self, shard: int) -> None:
        old, path = self._map(shard), self._path(shard)
        new_slots = 2 * self.slots[shard]
        tmp = path.with_name(path.name + ".grow")
        with open(tmp, "wb") as f:
            f.truncate(new_slots * self.dtype.itemsize)
        new = np.memmap(tmp, self.dtype, mode="r+", shape=(new_slots,))
        for lo in range(0, len(old), _CHUNK):
            chunk = old[lo : lo + _CHUNK]
            _place(new, np.asarray(chunk[chunk["k"] != 0]))
        new.flush()
        del new, old
        self._maps[shard] = self._arrays[shard] = None
        os.replace(tmp, path)
        self.slots[shard] = new_slots


def _probe(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """The entry of `table` equal to each key on every key field ("k", and "k2" if present), or zeros."""
    mask = len(table) - 1
    pos = (keys["k"] & np.uint64(mask)).astype(np.int64)
    out = np.zeros(len(keys), table.dtype)
    active = np.arange(len(keys))
    fields = [f for f in ("k", "k2") if f in table.dtype.names]
    while len(active) >= _SCALAR:
        slot = table[pos[active]]
        hit = np.logical_and.reduce([slot[f] == keys[f][active] for f in fields])
        out[active[hit]] = slot[hit]
        active = active[~hit & (slot["k"] != 0)]  # neither found nor at an empty slot: probe the next one
        pos[active] = (pos[active] + 1) & mask
    for i in active.tolist():
        p, key = int(pos[i]), keys[i]
        while table[p]["k"] != 0 and any(table[p][f] != key[f] for f in fields):
            p = (p + 1) & mask
        out[i] = table[p]
    return out


def _place(table: np.ndarray, entries: np.ndarray) -> None:
    """Put distinct new entries into free slots by linear probing, all at once: one array pass per probe round."""
    mask = len(table) - 1
    pos = (entries["k"] & np.uint64(mask)).astype(np.int64)
    active = np.arange(len(entries))
    while len(active) >= _SCALAR:
        free = table["k"][pos[active]] == 0
        # Several entries may want the same free slot: the first of each takes it, the others probe on.
        wanted, first = np.unique(pos[active][free], return_index=True)
        winners = np.flatnonzero(free)[first]
        table[wanted] = entries[active[winners]]
        placed = np.zeros(len(active), bool)
        placed[winners] = True
        active = active[~placed]
        pos[active] = (pos[active] + 1) & mask
    for i in active.tolist():
        p = int(pos[i])
        while table["k"][p] != 0:
            p = (p + 1) & mask
        table[p] = entries[i]
