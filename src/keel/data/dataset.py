"""One split of a prepared dataset as a token stream over its memory-mapped shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from keel.data.manifest import load_manifest, resolve_inside
from keel.errors import DataError


class TokenDataset:
    """One split of a prepared dataset as a single read-only token stream over memory-mapped shards."""

    def __init__(self, dataset_dir: str | Path, split: str):
        self.dir = Path(dataset_dir)
        self.split = split
        self.manifest = load_manifest(self.dir)
        splits = self.manifest.splits
        if split not in splits:
            raise DataError(f"{self.dir}: no {split!r} split (it has: {', '.join(splits)})")
        dtype = self.manifest.token_dtype
        # Empty files cannot be memory-mapped; they hold no tokens anyway.
        self._shards = [
            np.memmap(resolve_inside(self.dir, s.file), dtype=dtype, mode="r")
            for s in splits[split].shards
            if s.tokens > 0
        ]
        self._ends = np.cumsum([len(s) for s in self._shards], dtype=np.int64)
        self.num_tokens = int(self._ends[-1]) if len(self._ends) else 0
        tokenizer = self.manifest.tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.eos_id = tokenizer.eos_id
        self.tokenizer_path = resolve_inside(self.dir, tokenizer.file)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64; the range may span shards."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {self.split} split of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._ends, start, side="right"))
        done = 0
        while done < length:
            tokens = self._shards[shard]
            offset = start + done - (int(self._ends[shard]) - len(tokens))
            take = min(length - done, len(tokens) - offset)
            out[done : done + take] = tokens[offset : offset + take]
            done += take
            shard += 1
        return out

    def __reduce__(self):
        # Pickle (for DataLoader worker processes) by location: reopen the maps instead of copying the tokens.
        return TokenDataset, (self.dir, self.split)
