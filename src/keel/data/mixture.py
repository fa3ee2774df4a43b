"""Weighted mixtures of prepared datasets: a global index maps to (dataset, sample) by a pure function."""

from __future__ import annotations

import numpy as np

from keel.data.dataset import TokenDataset
from keel.errors import ConfigError, DataError

BLOCK = 1000  # every block of this many global samples holds each source's exact quota, so proportions are exact


def block_quotas(weights: list[float], block: int = BLOCK) -> list[int]:
    """Samples per block for each source: largest-remainder rounding of block * weight (they sum to block)."""
    total = sum(weights)
    exact = [block * w / total for w in weights]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (quotas[k] - exact[k], k))
    for k in by_remainder[: block - sum(quotas)]:
        quotas[k] += 1
    return quotas


class MixtureOrder:
    """Global index -> (source, index within that source's stream), a pure function of (weights, seed, index)."""

    def __init__(self, weights: list[float], seed: int, block: int = BLOCK):
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"data.mixture weights {weights} must be non-negative and not all zero")
        self.quotas, self.seed, self.block = block_quotas(weights, block), seed, block
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def locate(self, global_index: int) -> tuple[int, int]:
        """(source k, this sample's position among all of source k's samples)."""
        b, position = divmod(global_index, self.block)
        sources, ranks = self._layout(b)
        k = int(sources[position])
        return k, b * self.quotas[k] + int(ranks[position])

    def global_indices(self, k: int, positions: np.ndarray) -> np.ndarray:
        """The global indices that read these positions of source k's stream: the inverse of locate."""
        if not self.quotas[k]:
            return np.zeros(0, dtype=np.int64)
        blocks, ranks = np.divmod(np.asarray(positions, dtype=np.int64), self.quotas[k])
        out = np.empty(len(blocks), dtype=np.int64)
        for b in np.unique(blocks).tolist():  # only the blocks that hold one: at most one per position
            sources, _ = self._layout(b)
            here = blocks == b
            out[here] = b * self.block + np.flatnonzero(sources == k)[ranks[here]]  # source k's slots, in rank order
        return out

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != b:
            # One shuffle per block, seeded by (seed, block): any rank computes any block on its own.
            sources = np.repeat(np.arange(len(self.quotas)), self.quotas)
            sources = np.random.default_rng([self.seed, 1 << 20, b]).permutation(sources)
            ranks = np.empty(self.block, dtype=np.int64)
            for k in range(len(self.quotas)):
                where = sources == k
                ranks[where] = np.arange(int(where.sum()))
            self._cache = (b, sources, ranks)
        return self._cache[1], self._cache[2]


def open_mixture(mixture: dict[str, float], split: str) -> tuple[list[TokenDataset], list[float]]:
    """Open each dataset of a {dir: weight} mixture; all must share one tokenizer."""
    datasets = [TokenDataset(d, split) for d in mixture]
    first = datasets[0].manifest.tokenizer.sha256
    for ds in datasets[1:]:
        if ds.manifest.tokenizer.sha256 != first:
            raise DataError(
                f"data.mixture: {ds.dir} has another tokenizer than {datasets[0].dir}; "
                "prepare every dataset of a mixture with the same prepare.tokenizer"
            )
    return datasets, list(mixture.values())
