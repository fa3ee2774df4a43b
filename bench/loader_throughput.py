"""Loader throughput vs a raw memmap read of the same windows: inline BatchLoader and 2 prefetch workers."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import stdlib_dataset

from keel.data.dataset import TokenDataset
from keel.data.loader import BatchLoader
from keel.data.manifest import load_manifest
from keel.data.prefetch import PrefetchLoader

SEQ, BATCH = 256, 64


def raw_read(dataset: Path, loader: BatchLoader, batches: int) -> float:
    """Seconds to read the same windows straight from one memmap per shard (the floor a loader can reach)."""
    manifest = load_manifest(dataset)
    shard = manifest.splits["train"].shards[0]
    tokens = np.memmap(dataset / shard.file, dtype=manifest.token_dtype, mode="r")
    ids = [loader.locate(b * BATCH + k)[1] for b in range(batches) for k in range(BATCH)]
    t0 = time.perf_counter()
    for b in range(batches):
        np.stack([tokens[i * SEQ : i * SEQ + SEQ + 1].astype(np.int64) for i in ids[b * BATCH : (b + 1) * BATCH]])
    return time.perf_counter() - t0


def timed(loader: BatchLoader | PrefetchLoader, batches: int) -> float:
    loader.next_batch()  # start-up (worker processes) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "'set_vital' is deprecated")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = stdlib_dataset(Path(tmp))
        data = TokenDataset(dataset, "train")

        def make() -> BatchLoader:
            return BatchLoader(
                data, seq_len=SEQ, global_batch_size=BATCH, micro_batch_size=BATCH, rank=0, world_size=1, seed=0
            )

        assert len(data._shards) == 1, "the raw baseline reads one shard"
        runs = {"raw memmap": [], "BatchLoader inline": [], "PrefetchLoader 2 workers": []}
        for _ in range(args.repeats):
            runs["raw memmap"].append(raw_read(dataset, make(), args.batches))
            runs["BatchLoader inline"].append(timed(make(), args.batches))
            ahead = PrefetchLoader(make(), num_workers=2, prefetch_factor=4)
            runs["PrefetchLoader 2 workers"].append(timed(ahead, args.batches))
            ahead.close()
        tokens = args.batches * BATCH * SEQ
        raw = statistics.median(runs["raw memmap"])
        for name, seconds in runs.items():
            s = statistics.median(seconds)
            print(f"{name}: {tokens / s / 1e6:.1f} M tokens/s (median of {args.repeats}), {raw / s:.2f}x raw")


if __name__ == "__main__":
    main()
