"""Dedup store at scale: insert N synthetic documents' keys (exact + near), report documents/s over time and bytes.

Each document has a random 16-byte digest, a random 128 x uint32 MinHash signature and its 11 band keys (threshold
0.8), as the pool workers compute them; one document in ten repeats an earlier digest and one in ten an earlier
signature, so both duplicate paths run. Batches of --batch documents go through `DedupStore.check` as prepare's
scan sends them. Reported: documents/s over the first and the last 10% of the documents (the decay), and bytes on
disk per document, split into the hash tables and the logs (the kept signatures are 512 bytes each).

    PYTHONPATH=src .venv/bin/python bench/dedup_store.py --documents 10000000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from keel.data.dedup_store import DedupStore, Keys


def batch_keys(rng: np.random.Generator, start: int, n: int, bands: int, seen: np.ndarray) -> list[Keys]:
    """n documents' keys; a tenth reuse an earlier digest and a tenth an earlier signature (from `seen`)."""
    digests = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    signatures = rng.integers(0, 256, (n, 512), dtype=np.uint8)
    keys = rng.integers(0, 256, (n, 8 * bands), dtype=np.uint8)
    if start:
        pick = rng.integers(0, len(seen), n // 10)
        digests[: n // 10] = seen[pick, :16]
        signatures[n // 10 : 2 * (n // 10)] = seen[pick, 16 : 16 + 512]
        keys[n // 10 : 2 * (n // 10)] = seen[pick, 16 + 512 :]
    seen[rng.integers(0, len(seen), n // 10)] = np.concatenate([digests, signatures, keys], axis=1)[-(n // 10) :]
    return [Keys(0, start + i, digests[i].tobytes(), signatures[i].tobytes(), keys[i].tobytes()) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = DedupStore(Path(tmp) / "dedup", exact=True, near_threshold=0.8)
        assert store.hasher is not None
        bands = store.hasher.bands
        rng = np.random.default_rng(0)
        seen = np.zeros((100_000, 16 + 512 + 8 * bands), np.uint8)
        tenth = args.documents // 10
        marks, spent, dropped = {}, 0.0, 0
        for start in range(0, args.documents, args.batch):
            docs = batch_keys(rng, start, min(args.batch, args.documents - start), bands, seen)
            t0 = time.perf_counter()
            dropped += sum(s is not None for s in store.check(docs))
            spent += time.perf_counter() - t0  # generating the keys is not the store's time
            for mark in range(tenth, args.documents + 1, tenth):
                if start < mark <= start + len(docs):
                    marks[mark] = (start + len(docs), spent)
        store.close()
        size = store.bytes_on_disk()
        tables = sum(p.stat().st_size for p in store.path.glob("*-*.bin"))
        points = [(0, 0.0)] + [marks[m] for m in sorted(marks)]
        rates = [(d - d0) / (t - t0) for (d0, t0), (d, t) in zip(points, points[1:], strict=False)]
        first, last, t3 = rates[0], rates[-1], points[-1][1]
        print("documents/s per tenth: " + ", ".join(f"{r:,.0f}" for r in rates))
        print(
            f"{args.documents:,} documents ({dropped:,} dropped as duplicates) in {t3:.0f} s of store time: "
            f"first 10% {first:,.0f} documents/s, last 10% {last:,.0f} documents/s "
            f"(last / first = {last / first:.2f}); "
            f"{size / args.documents:.0f} bytes per document on disk: hash tables {tables / args.documents:.0f}, "
            f"logs {(size - tables) / args.documents:.0f} (of which signatures "
            f"{(store.path / 'signatures.log').stat().st_size / args.documents:.0f})"
        )


if __name__ == "__main__":
    main()
