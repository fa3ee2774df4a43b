"""Write one split's token shards: raw `.bin` token files plus `.idx` document start offsets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from keel.data.manifest import Shard, Split


class ShardWriter:
    """Append documents to a split's shards of exactly shard_tokens tokens each (the last may be shorter)."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, np.dtype(dtype), shard_tokens
        self.shards: list[Shard] = []
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._filled = 0
        self._starts: list[np.ndarray] = []
        self._origins: list[np.ndarray] = []
        (root / split).mkdir(parents=True, exist_ok=True)

    @property
    def tokens(self) -> int:
        """Tokens written so far, in finished shards and the open one."""
        return sum(s.tokens for s in self.shards) + self._filled

    def add(self, docs: list[np.ndarray], origins: np.ndarray) -> None:
        """Append documents (each ending in EOS) from origins [n, 2] = (file, ordinal); one may span two shards."""
        if not docs:
            return
        tokens = np.concatenate(docs).astype(self.dtype, copy=False)
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]], dtype=np.int64)
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._filled)
            starting = (starts >= pos) & (starts < pos + take)
            self._starts.append(starts[starting] - pos + self._filled)
            self._origins.append(origins[starting])
            data = tokens[pos : pos + take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._filled += take
            pos += take
            if self._filled == self.shard_tokens:
                self._close()

    def checkpoint(self) -> dict:
        """Make the open shard's tokens durable and return what `resume` needs to continue exactly here."""
        state: dict = {"shards": [s.model_dump(mode="json", exclude_none=True) for s in self.shards], "open": None}
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            state["open"] = {
                "filled": self._filled,
                "starts": np.concatenate(self._starts or [np.zeros(0, np.int64)]).tolist(),
                "origins": np.concatenate(self._origins or [np.zeros((0, 2), np.int64)]).tolist(),
            }
        return state

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint: finished shards stay as they are; the open one is cut back to its length."""
        self.shards = [Shard.model_validate(s) for s in state["shards"]]
        opened = state["open"]
        if opened is None:
            return
        self._open(mode="r+b")
        assert self._file is not None
        # Tokens written after the checkpoint are cut off; they are written again from the checkpoint's position.
        self._file.truncate(opened["filled"] * self.dtype.itemsize)
        self._file.seek(0)
        while chunk := self._file.read(8 << 20):
            self._hash.update(chunk)
        self._filled = opened["filled"]
        self._starts = [np.array(opened["starts"], dtype=np.int64)]
        self._origins = [np.array(opened["origins"], dtype=np.int64).reshape(-1, 2)]

    def finish(self) -> Split:
        """Close the last shard; return the split's manifest entry (tokens, documents, shards)."""
        if self._file is not None:
            self._close()
        return Split(
            tokens=sum(s.tokens for s in self.shards),
            documents=sum(s.documents for s in self.shards),
            shards=self.shards,
        )

    def _open(self, mode: str = "wb") -> None:
        name = f"{self.split}/{len(self.shards):05d}"
        self._file = open(self.root / f"{name}.bin", mode)
        self._hash = hashlib.sha256()
        self._filled = 0
        self._starts = []
        self._origins = []

    def _close(self) -> None:
        assert self._file is not None
        name = f"{self.split}/{len(self.shards):05d}"
        _sync_close(self._file)
        self._file = None
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        with open(self.root / f"{name}.idx", "wb") as f:  # a file object, so np.save adds no ".npy"
            np.save(f, starts.astype(np.int64))
            _sync_close(f)
        origins = np.concatenate(self._origins) if self._origins else np.zeros((0, 2), np.int64)
        with open(self.root / f"{name}.docs", "wb") as f:
            np.save(f, origins.astype(np.int64))
            _sync_close(f)
        self.shards.append(
            Shard(
                file=f"{name}.bin",
                index=f"{name}.idx",
                origins=f"{name}.docs",
                tokens=self._filled,
                documents=len(starts),
                sha256=self._hash.hexdigest(),
            )
        )


def _sync_close(f: BinaryIO) -> None:
    # Shards must be on disk before the manifest that vouches for them.
    f.flush()
    os.fsync(f.fileno())
    f.close()
