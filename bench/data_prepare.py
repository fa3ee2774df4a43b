"""Prepare throughput (MB/s per core): stdlib Python as .jsonl.zst + Parquet, stages off vs all on."""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        sources, size = corpus(root / "raw", args.megabytes)
        tok = root / "tok"
        prepare_dataset(sources, tok, vocab_size=8192, log=lambda m: None)  # train the BPE once, outside the timing
        results = {}
        for name, stages in (("stages off", StageSettings()), ("all stages on", ALL_ON)):
            seconds = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                prepare_dataset(
                    sources,
                    root / f"{name}-{r}".replace(" ", "_"),
                    tokenizer=str(tok / "tokenizer.json"),
                    stages=stages,
                    log=lambda m: None,
                )
                seconds.append(time.perf_counter() - t0)
            results[name] = statistics.median(seconds)
        for name, s in results.items():
            mbps = size / 1e6 / s
            print(
                f"{name}: {size / 1e6:.1f} MB in {s:.2f} s (median of {args.repeats}): "
                f"{mbps:.2f} MB/s, {mbps / cores:.2f} MB/s per core ({cores} cores)"
            )


if __name__ == "__main__":
    main()
