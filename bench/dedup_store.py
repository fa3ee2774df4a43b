"""Dedup store at scale: insert N synthetic documents' keys (exact + near), report documents/s over time and bytes.

Each document has a random 16-byte digest and 11 random band keys (threshold 0.8), as the pool workers compute them;
one document in ten repeats an earlier digest and one in ten an earlier document's band keys, so both duplicate paths
run. Batches of --batch documents go through `DedupStore.check` as prepare's scan sends them. Reported per run:
documents/s over the first and the last 10% of the documents (the decay), by the clock and per second of the
process's CPU time (user + system: what other jobs on a shared machine do not change), the disk the store takes at
its largest (the scan's hash tables with the logs) and once closed (the logs a merge joins on), per document; then
the medians over --repeats runs, each in a fresh process.

    PYTHONPATH=src .venv/bin/python bench/dedup_store.py --documents 10000000 --repeats 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from keel.data.dedup_store import DedupStore, Keys


def batch_keys(rng: np.random.Generator, start: int, n: int, bands: int, seen: np.ndarray) -> list[Keys]:
    """n documents' keys; a tenth reuse an earlier digest and a tenth an earlier document's band keys (from `seen`)."""
    digests = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    keys = rng.integers(0, 256, (n, 8 * bands), dtype=np.uint8)
    if start:
        pick = rng.integers(0, len(seen), n // 10)
        digests[: n // 10] = seen[pick, :16]
        keys[n // 10 : 2 * (n // 10)] = seen[pick, 16:]
    seen[rng.integers(0, len(seen), n // 10)] = np.concatenate([digests, keys], axis=1)[-(n // 10) :]
    return [Keys(0, start + i, digests[i].tobytes(), keys[i].tobytes()) for i in range(n)]


def run(documents: int, batch: int, where: str | None) -> tuple[float, ...]:
    """One run: documents/s over the first and the last 10% (clock, CPU), bytes per document at the largest, closed."""
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = DedupStore(Path(tmp) / "dedup", exact=True, near_threshold=0.8)
        rng = np.random.default_rng(0)
        seen = np.zeros((100_000, 16 + 8 * store.bands), np.uint8)
        tenth = documents // 10
        marks, spent, cpu, dropped, peak = {}, 0.0, 0.0, 0, 0
        for start in range(0, documents, batch):
            docs = batch_keys(rng, start, min(batch, documents - start), store.bands, seen)
            t0, c0 = time.perf_counter(), time.process_time()
            dropped += sum(s is not None for s in store.check(docs))
            spent += time.perf_counter() - t0  # generating the keys is not the store's time
            cpu += time.process_time() - c0
            for mark in range(tenth, documents + 1, tenth):
                if start < mark <= start + len(docs):
                    marks[mark] = (start + len(docs), spent, cpu)
                    peak = max(peak, store.bytes_on_disk())
        t0 = time.perf_counter()
        store.close()
        closing = time.perf_counter() - t0
        size = store.bytes_on_disk()
    points = [(0, 0.0, 0.0)] + [marks[m] for m in sorted(marks)]
    rates = [(d - d0) / (t - t0) for (d0, t0, _), (d, t, _) in zip(points, points[1:], strict=False)]
    cpu_rates = [(d - d0) / (c - c0) for (d0, _, c0), (d, _, c) in zip(points, points[1:], strict=False)]
    print("documents/s per tenth: " + ", ".join(f"{r:,.0f}" for r in rates))
    print("documents per CPU second per tenth: " + ", ".join(f"{r:,.0f}" for r in cpu_rates))
    print(
        f"{documents:,} documents ({dropped:,} dropped as duplicates) in {points[-1][1]:.0f} s of store time "
        f"({points[-1][2]:.0f} s CPU; +{closing:.1f} s to close): first 10% {rates[0]:,.0f} documents/s "
        f"({cpu_rates[0]:,.0f} per CPU second), last 10% {rates[-1]:,.0f} ({cpu_rates[-1]:,.0f}): last / first "
        f"{rates[-1] / rates[0]:.2f} ({cpu_rates[-1] / cpu_rates[0]:.2f} in CPU time); bytes per document on disk: "
        f"{peak / documents:.0f} at the largest (tables and logs), {size / documents:.0f} closed "
        f"({size / (documents - dropped):.0f} per kept one)",
        flush=True,
    )
    return rates[0], rates[-1], cpu_rates[0], cpu_rates[-1], peak / documents, size / documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    args = parser.parse_args()
    # Each run in a fresh process, as `keel data prepare` runs its store: a process that ran one already has its
    # allocator's pages at hand and starts the next faster, which is not the start a prepare has.
    spawn = multiprocessing.get_context("spawn")
    runs = []
    for _ in range(args.repeats):
        with spawn.Pool(1) as pool:
            runs.append(pool.apply(run, (args.documents, args.batch, args.dir)))
    first, last, cpu_first, cpu_last, peak, closed = (statistics.median(column) for column in zip(*runs, strict=True))
    print(
        f"medians of {len(runs)}: first 10% {first:,.0f} documents/s ({cpu_first:,.0f} per CPU second), last 10% "
        f"{last:,.0f} ({cpu_last:,.0f}); last / first {statistics.median(r[1] / r[0] for r in runs):.2f} "
        f"({statistics.median(r[3] / r[2] for r in runs):.2f} in CPU time); "
        f"bytes per document {peak:.0f} at the largest, {closed:.0f} closed"
    )


if __name__ == "__main__":
    main()
