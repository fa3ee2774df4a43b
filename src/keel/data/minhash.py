"""MinHash signatures and LSH band keys for near-duplicate detection.

Not `datasketch`: its LSH index lives in process memory (or Redis / Cassandra), while prepare must keep
bounded memory and resume after a crash, so the index is our on-disk `DedupStore`; what remains, the
signature and its band keys, is the same universal-hash family (a*x+b mod 2**61-1) in a few lines of numpy, where the
package would bring scipy along.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")
_WORD_BYTES = re.compile(rb"\w+")
_BLOCK = 1024  # shingles per block of the (shingles x permutations) product


def _mod_mersenne(y: np.ndarray) -> np.ndarray:
    """y % (2**61 - 1), in place, without a division: 2**61 = 1 modulo the prime, so fold the high bits on."""
    high = y >> np.uint64(61)
    y &= _MERSENNE
    y += high  # now < 2**61 + 8: at most one subtraction is left, and it is almost never needed
    if y.max() >= _MERSENNE:
        np.subtract(y, _MERSENNE, out=y, where=y >= _MERSENNE)
    return y


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    pairs = [(b, num_perm // b) for b in range(1, num_perm + 1)]
    return min(pairs, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))


class MinHasher:
    """A fixed MinHash permutation family: the same signatures on every machine and in every process."""

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        self.ngram = ngram
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, int(_MERSENNE), num_perm, dtype=np.uint64)
        self._b = rng.integers(0, int(_MERSENNE), num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_bands(num_perm, threshold)

    def signature(self, text: str) -> bytes:
        """MinHash signature over word n-gram shingles (uint32 per permutation), as bytes."""
        lower = text.lower()
        if lower.isascii():  # ASCII \w is [A-Za-z0-9_] in both str and bytes patterns: hash the bytes as they are
            words: list = _WORD_BYTES.findall(lower.encode())
            space = b" "
        else:
            words, space = [w.encode() for w in _WORD.findall(lower)], b" "
        n = max(1, min(self.ngram, len(words)))
        # The n-grams joined by single spaces, as before, but built and hashed in C (zip, map, set).
        shingles = set(map(space.join, zip(*(words[i:] for i in range(n)), strict=False))) if words else {b""}
        x = np.fromiter(map(zlib.crc32, shingles), dtype=np.uint64, count=len(shingles))
        best = np.full(len(self._a), _MERSENNE, dtype=np.uint64)
        for lo in range(0, len(x), _BLOCK):  # bounded memory for a huge document
            # uint64 products wrap; that is still a fixed pseudo-random permutation family, the same on every machine.
            y = np.multiply.outer(x[lo : lo + _BLOCK], self._a)
            y += self._b
            np.minimum(best, _mod_mersenne(y).min(axis=0), out=best)
        return best.astype(np.uint32).tobytes()

    def band_hashes(self, signature: bytes) -> bytes:
        """The signature's LSH band keys, a uint64 each: sharing one with a kept document makes a near duplicate."""
        step = 4 * self.rows
        # The band's number is hashed in: equal values in different bands are different keys.
        return b"".join(
            hashlib.blake2b(signature[i * step : (i + 1) * step], digest_size=8, salt=bytes([i])).digest()
            for i in range(self.bands)
        )
