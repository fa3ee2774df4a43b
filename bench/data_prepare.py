"""Prepare throughput (MB/s per core): stdlib Python as .jsonl.zst + Parquet, stages off vs on, 1 worker vs a pool."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings

ALL_ON = StageSettings(
    normalize="NFC",
    min_words=5,
    max_repeated_line_fraction=0.9,
    max_symbol_ratio=0.9,
    dedup_exact=True,
    dedup_near_threshold=0.8,
    pii=True,
)


def corpus(root: Path, megabytes: float) -> tuple[list[str], int]:
    """Half the stdlib files (up to `megabytes`) as a .jsonl.zst, half as a .parquet; returns globs and bytes."""
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    half = len(texts) // 2
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts[:half]).encode()
    (root / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": texts[half:]}), root / "b.parquet")
    return [str(root / "*.jsonl.zst"), str(root / "*.parquet")], size


def _spin(n: int) -> int:
    return sum(i * i for i in range(n))


def ceiling(workers: int, repeats: int) -> float:
    """How much faster a pure-Python loop runs in a pool of `workers` than in 1 process: the machine's own limit."""
    ctx = multiprocessing.get_context("forkserver")
    rates = {}
    for n in (1, workers):
        with ctx.Pool(n) as pool:
            pool.map(_spin, [1] * n)  # start the processes outside the timing
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                pool.map(_spin, [2_000_000] * 2 * workers)
                seconds.append(time.perf_counter() - t0)
        rates[n] = 1 / statistics.median(seconds)
    return rates[workers] / rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size (default: every core)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        sources, size = corpus(root / "raw", args.megabytes)
        tok = root / "tok"
        prepare_dataset(sources, tok, vocab_size=8192, log=lambda m: None)  # train the BPE once, outside the timing
        results = {}
        for name, stages in (("stages off", StageSettings()), ("all stages on", ALL_ON)):
            for workers in (1, args.workers):
                seconds = []
                for r in range(args.repeats):
                    t0 = time.perf_counter()
                    prepare_dataset(
                        sources,
                        root / f"{name}-{workers}-{r}".replace(" ", "_"),
                        tokenizer=str(tok / "tokenizer.json"),
                        stages=stages,
                        workers=workers,
                        log=lambda m: None,
                    )
                    seconds.append(time.perf_counter() - t0)
                results[name, workers] = statistics.median(seconds)
        limit = ceiling(args.workers, args.repeats)
        for name in ("stages off", "all stages on"):
            rates = {w: size / 1e6 / results[name, w] for w in (1, args.workers)}
            print(
                f"{name}: {size / 1e6:.1f} MB (median of {args.repeats}): 1 worker {rates[1]:.2f} MB/s; "
                f"pool of {args.workers} {rates[args.workers]:.2f} MB/s ({rates[args.workers] / args.workers:.2f} "
                f"MB/s per core); pool / 1 worker = {rates[args.workers] / rates[1]:.2f}x"
            )
        print(f"machine ceiling: a pure-Python loop in a pool of {args.workers} / 1 process = {limit:.2f}x")


if __name__ == "__main__":
    main()
