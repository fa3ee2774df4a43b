"""Dedup store at scale: N synthetic documents' keys (exact + near) added, then decided; documents/s and bytes.

Each document has a random 16-byte digest and 11 random band keys (threshold 0.8), as the pool workers compute them;
one document in ten repeats an earlier digest and one in ten an earlier document's band keys, so both duplicate paths
run. Batches of --batch documents go to `DedupStore.add` as prepare's scan sends them; then `decide` sorts the keys
and yields every verdict. Reported per run, per second of the process's CPU time (user + system: what other jobs on a
shared machine do not change) and by the clock: documents/s of the adds over the first and the last 10% of the
documents (does adding slow down as the store grows?), of deciding, and of the whole store (adds + decide); the same
whole-store rate for a run of a tenth as many documents (--documents / 10), whose ratio to the full run's is the decay
over a 10x larger corpus; and the disk the store takes at its largest (keys pending) and closed (the logs a merge joins
on), per document. Medians over --repeats runs, each in a fresh process as `keel data prepare` runs its store.

    PYTHONPATH=src .venv/bin/python bench/dedup_store.py --documents 10000000 --repeats 3 --dir /tmp
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from keel.data.dedup_store import DedupStore, Keys
from keel.data.pool import StagePool


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


def run(documents: int, batch: int, where: str | None, workers: int = 1) -> dict[str, float]:
    """One run's rates (documents per CPU second and per second) and bytes per document; partitions sorted in a pool
    of `workers` (whose CPU time the figures per CPU second leave out: compare them by the clock)."""
    pool = StagePool(workers)
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        store = DedupStore(Path(tmp) / "dedup", exact=True, near_threshold=0.8)
        rng = np.random.default_rng(0)
        seen = np.zeros((100_000, 16 + 8 * store.bands), np.uint8)
        tenth = max(documents // 10, 1)
        marks, wall, cpu = [(0, 0.0, 0.0)], 0.0, 0.0
        for start in range(0, documents, batch):
            docs = batch_keys(rng, start, min(batch, documents - start), store.bands, seen)
            t0, c0 = time.perf_counter(), time.process_time()
            store.add(docs)
            wall += time.perf_counter() - t0  # generating the keys is not the store's time
            cpu += time.process_time() - c0
            if (start + len(docs)) // tenth > start // tenth:
                marks.append((start + len(docs), wall, cpu))
        peak = store.bytes_on_disk()
        t0, c0 = time.perf_counter(), time.process_time()
        dropped = sum(int((d.verdicts != 0).sum()) for d in store.decide(each=pool.run, processes=workers))
        store.close()
        pool.close()
        decide_wall, decide_cpu = time.perf_counter() - t0, time.process_time() - c0
        closed = store.bytes_on_disk()
    (first, _, cpu_first), (second, _, cpu_second) = marks[0], marks[1]
    (before_last, _, cpu_before_last), (last, _, cpu_last) = marks[-2], marks[-1]
    out = {
        "add_first": (second - first) / (cpu_second - cpu_first),
        "add_last": (last - before_last) / (cpu_last - cpu_before_last),
        "decide": documents / decide_cpu,
        "decide_wall": documents / decide_wall,
        "store": documents / (cpu + decide_cpu),
        "store_wall": documents / (wall + decide_wall),
        "peak": peak / documents,
        "closed": closed / documents,
    }
    print(
        f"{documents:,} documents ({dropped:,} dropped as duplicates): adds {cpu:.1f} s CPU ({wall:.1f} s), first "
        f"10% {out['add_first']:,.0f} documents per CPU second, last 10% {out['add_last']:,.0f}; decide "
        f"{decide_cpu:.1f} s CPU ({decide_wall:.1f} s), {out['decide']:,.0f} per CPU second; the store in all "
        f"{out['store']:,.0f} per CPU second ({out['store_wall']:,.0f}/s); bytes per document {out['peak']:.0f} at "
        f"the largest, {out['closed']:.0f} closed",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    parser.add_argument("--workers", type=int, default=1, help="processes that sort the partitions (a pool above 1)")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")  # a fresh process a run: no allocator pages left by the last one
    small, large = [], []
    for _ in range(args.repeats):
        for documents, runs in ((args.documents // 10, small), (args.documents, large)):
            with ProcessPoolExecutor(1, mp_context=spawn) as fresh:  # not a daemon: it may start a pool of its own
                runs.append(fresh.submit(run, documents, args.batch, args.dir, args.workers).result())

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    decay = [b["store"] / a["store"] for a, b in zip(small, large, strict=True)]
    adds = [r["add_last"] / r["add_first"] for r in large]
    print(
        f"medians of {len(large)}: {args.documents:,} documents, the store {median(large, 'store'):,.0f} documents "
        f"per CPU second ({median(large, 'store_wall'):,.0f}/s); {args.documents // 10:,} documents "
        f"{median(small, 'store'):,.0f}; large / small {statistics.median(decay):.2f} (runs "
        f"{', '.join(f'{d:.2f}' for d in decay)}); adds last / first 10% {statistics.median(adds):.2f}; decide "
        f"{median(large, 'decide'):,.0f} per CPU second ({median(large, 'decide_wall'):,.0f}/s, {args.workers} "
        f"process(es) sorting); bytes per document {median(large, 'peak'):.0f} at the "
        f"largest, {median(large, 'closed'):.0f} closed"
    )


if __name__ == "__main__":
    main()
