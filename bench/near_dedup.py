"""Near dedup by LSH agreement (what the store does) against the verified rule it replaced, on labelled corpora.

The replaced rule: a document is a near duplicate if the first kept document with one of its band values has a
MinHash signature agreeing on at least the threshold's share of positions (each kept signature stored, 512 bytes).
LSH agreement: a document is a near duplicate if one of its band keys is a kept document's (nothing verified, 88
bytes a kept document). The truth: a document is a near duplicate if its word 5-gram Jaccard similarity with an
earlier kept document reaches the threshold. Printed per corpus and rule: near drops, precision, recall.

    PYTHONPATH=src .venv/bin/python bench/near_dedup.py
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Iterator

import numpy as np

from keel.data.minhash import MinHasher

THRESHOLD = 0.8


def shingles(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    n = max(1, min(n, len(words)))
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def corpora(seed: int) -> Iterator[tuple[str, list[str]]]:
    """Edited copies at every similarity (random words replaced), and short documents over a small vocabulary."""
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(5000)]
    originals = [" ".join(rng.choices(vocabulary, k=rng.choice([100, 300, 1000]))) for _ in range(400)]
    edited = []
    for text in originals:
        words = text.split()
        for _ in range(int(len(words) * rng.uniform(0.0, 0.08))):
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
        edited.append(" ".join(words))
    yield "edited copies (400 + 400 documents of 100-1,000 words)", originals + edited
    small = [f"{w}{d}" for w in "the a model reads tokens and predicts next one while".split() for d in range(40)]
    texts = [" ".join(rng.choices(small, k=60)) for _ in range(150)]
    for _ in range(150):
        base = rng.choice(texts).split()
        for _ in range(rng.choice([0, 1, 2, 3])):
            base[rng.randrange(len(base))] = rng.choice(small)
        texts.insert(rng.randrange(len(texts) + 1), " ".join(base))
    yield "short copies with 0-3 words changed (300 documents of 60 words)", texts


def decide(signatures: list[bytes], hasher: MinHasher, hit: Callable[[bytes, bytes], bool]) -> list[bool]:
    """Near-duplicate or not, in order: against the first kept document with each of the document's band values."""
    first: dict = {}
    out = []
    step = 4 * hasher.rows
    for signature in signatures:
        bands = [(b, signature[b * step : (b + 1) * step]) for b in range(hasher.bands)]
        near = any(band in first and hit(first[band], signature) for band in bands)
        if not near:
            for band in bands:
                first.setdefault(band, signature)
        out.append(near)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    hasher = MinHasher(THRESHOLD)
    need = int(np.ceil(THRESHOLD * 128))

    def verified(a: bytes, b: bytes) -> bool:
        return int((np.frombuffer(a, np.uint32) == np.frombuffer(b, np.uint32)).sum()) >= need

    rules = {"verified signatures (replaced)": verified, "LSH agreement (the store)": lambda a, b: True}
    for name, texts in corpora(args.seed):
        sets = [shingles(t) for t in texts]
        signatures = [hasher.signature(t) for t in texts]
        print(name)
        for rule, hit in rules.items():
            near = decide(signatures, hasher, hit)
            kept = [i for i, n in enumerate(near) if not n]
            truth = [
                max((len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for j in kept if j < i), default=0.0) >= THRESHOLD
                for i in range(len(texts))
            ]
            tp = sum(n and t for n, t in zip(near, truth, strict=True))
            fp, fn = sum(near) - tp, sum(truth) - tp
            print(
                f"  {rule:32s} near drops {sum(near):4d}  precision {tp / max(tp + fp, 1):.3f}  "
                f"recall {tp / max(tp + fn, 1):.3f}  (false drops {fp}, missed {fn})"
            )


if __name__ == "__main__":
    main()
