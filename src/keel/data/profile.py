"""What a prepared dataset holds, measured from its files: document lengths (all of them) and languages (a sample).

Both are read from the dataset as it is now, not recorded by prepare: they need no manifest change, hold for
datasets prepared before this module, merged datasets and datasets after `keel data remove`, and cost prepare
nothing. Lengths come from the document index (.idx, 8 bytes a document). Languages are guessed by py3langid
(a maintained fork of langid.py, its model shipped in the package) on the first LANGUAGE_PREFIX tokens of
LANGUAGE_SAMPLE documents per split drawn at random with a fixed seed, so the guess is an estimate with a stated
margin; on source code it names the language of the comments and identifiers, and `zxx` means no language.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.data.dataset import TokenDataset
from keel.data.manifest import Manifest, resolve_inside
from keel.data.tokenizer import load_tokenizer

LANGUAGE_SAMPLE = 1000  # documents per split whose language is guessed: a share within about 3 points (95%)
LANGUAGE_PREFIX = 256  # tokens decoded per sampled document, about 1,000 characters: enough for a stable guess
QUANTILES = {"min": 0.0, "p10": 0.1, "median": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}


@dataclass(frozen=True)
class Lengths:
    """Document lengths of a split in tokens (the EOS that ends each included)."""

    documents: int
    mean: float
    quantiles: dict[str, int]
    histogram: list[tuple[int, int, int]]  # (shortest, longest, documents) per power-of-two bin with documents


@dataclass(frozen=True)
class Languages:
    """Guessed languages of a random sample of a split's documents."""

    documents: int
    sampled: int
    counts: dict[str, int]  # language code -> sampled documents, most frequent first

    @property
    def margin(self) -> float:
        """Half-width of the 95% interval of any share, at worst (share 1/2), with the finite-population correction."""
        if self.sampled >= self.documents:
            return 0.0
        return 1.96 * math.sqrt(0.25 / self.sampled * (self.documents - self.sampled) / (self.documents - 1))


def document_bounds(root: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Each document's first token and end in the split's stream (a document may run over a shard's end)."""
    starts, base = [np.zeros(0, np.int64)], 0
    for shard in manifest.splits[split].shards:
        starts.append(np.load(resolve_inside(root, shard.index)).astype(np.int64) + base)
        base += shard.tokens
    start = np.concatenate(starts)
    return start, np.append(start[1:], base)


def lengths(sizes: np.ndarray) -> Lengths | None:
    """The length profile of documents of these sizes; None when there are none."""
    if not len(sizes):
        return None
    quantiles = {name: int(np.quantile(sizes, q, method="lower")) for name, q in QUANTILES.items()}
    bins = np.floor(np.log2(np.maximum(sizes, 1))).astype(np.int64)
    counts = np.bincount(bins)
    histogram = [(2**k, 2 ** (k + 1) - 1, int(n)) for k, n in enumerate(counts) if n]
    return Lengths(len(sizes), float(sizes.mean()), quantiles, histogram)


def languages(root: Path, split: str, starts: np.ndarray, ends: np.ndarray) -> Languages | None:
    """Guess the language of LANGUAGE_SAMPLE random documents of a split (all of a smaller one); None if empty."""
    if not len(starts):
        return None
    import py3langid  # loads its model (about 1 s): only the cards pay for it

    data = TokenDataset(root, split)
    tokenizer = load_tokenizer(data.tokenizer_path)
    picked = np.sort(np.random.default_rng(0).choice(len(starts), min(len(starts), LANGUAGE_SAMPLE), replace=False))
    counts: dict[str, int] = {}
    for i in picked:
        ids = data.read(int(starts[i]), int(min(ends[i] - starts[i], LANGUAGE_PREFIX)))
        text = tokenizer.decode(ids[ids != data.eos_id].tolist())
        code = py3langid.classify(text)[0] if text.strip() else "zxx"
        counts[code] = counts.get(code, 0) + 1
    ranked = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return Languages(len(starts), len(picked), ranked)
