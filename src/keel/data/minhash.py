"""Near-duplicate detection with MinHash LSH (numpy; `datasketch` is not on our package index)."""

from __future__ import annotations

import re
import zlib

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1)]
    return min(pairs, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))


class NearDedup:
    """Streaming near-duplicate filter: a document whose estimated Jaccard with an earlier one >= threshold is seen."""

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.threshold, self.ngram = threshold, ngram
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self._b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_bands(num_perm, threshold)
        self._buckets: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
        # Signatures of kept documents, to confirm an LSH candidate before dropping anything.
        self._signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        """MinHash signature over word n-gram shingles (uint32 per permutation)."""
        words = _WORD.findall(text.lower())
        n = max(1, min(self.ngram, len(words)))
        shingles = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
        # uint64 products wrap; that is still a fixed pseudo-random permutation family, the same on every machine.
        hashed = (np.outer(x, self._a) + self._b) % _MERSENNE
        return hashed.min(axis=0).astype(np.uint32)

    def is_duplicate(self, text: str) -> bool:
        """True if text nearly duplicates a document kept earlier; otherwise remember it and return False."""
        sig = self.signature(text)
        keys = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        for band, key in enumerate(keys):
            earlier = self._buckets[band].get(key)
            if earlier is not None and np.mean(self._signatures[earlier] == sig) >= self.threshold:
                return True
        doc = len(self._signatures)
        self._signatures.append(sig)
        for band, key in enumerate(keys):
            self._buckets[band].setdefault(key, doc)
        return False
