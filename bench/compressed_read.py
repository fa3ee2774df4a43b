"""What the main process does per compressed JSON Lines file: before, decompress and parse; now, decompress and cut.

Writes --megabytes of JSON Lines (prose-like records of 200-8,000 characters) as .jsonl.gz and .jsonl.zst, then
times in CPU seconds of this one process (the machine is shared: the clock would time the other jobs), medians of
--repeats:

- before: the main process read every record itself (`read_records`: decompress, split lines, parse the JSON);
- now: the main process plans the spans (`plan`: decompress, cut about 1 MB of whole lines a span), and a worker
  parses a span (`read_span`), timed apart;
- the floor: the whole file decompressed in one call (`gzip.decompress`, zstandard's one-shot decompress).

The ratio now / before is how many more workers' input one main process keeps up with.

    PYTHONPATH=src .venv/bin/python bench/compressed_read.py --megabytes 64 --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

from keel.data.sources import SourceFile, read_records
from keel.data.spans import plan, read_span

TASK = 1_000_000  # keel.data.pool.TASK_CHARS


def corpus(megabytes: float) -> bytes:
    rng = random.Random(0)
    words = [rng.choice("etaoinshrdlu") * rng.randint(1, 9) for _ in range(5000)]
    lines, size = [], 0
    while size < megabytes * 1e6:
        text = " ".join(rng.choices(words, k=rng.randint(40, 1600)))
        lines.append(json.dumps({"text": text, "id": len(lines)}) + "\n")
        size += len(lines[-1])
    return "".join(lines).encode()


def timed(work: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median CPU seconds of `work` and what it counted."""
    times, count = [], 0
    for _ in range(repeats):
        t0 = time.process_time()
        count = work()
        times.append(time.process_time() - t0)
    return statistics.median(times), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = corpus(args.megabytes)
    mb = len(data) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        zstd = (zstandard.ZstdCompressor().compress, zstandard.ZstdDecompressor().decompress)
        for suffix, (compress, decompress) in ((".jsonl.gz", (gzip.compress, gzip.decompress)), (".jsonl.zst", zstd)):
            path = Path(tmp) / f"corpus{suffix}"
            path.write_bytes(compress(data))
            packed = path.read_bytes()
            floor, _ = timed(lambda c=packed, d=decompress: len(d(c)), args.repeats)
            source = SourceFile(str(path), 0, path.name)
            before, records = timed(lambda p=str(path): sum(1 for _ in read_records(p, "text")), args.repeats)
            now, spans = timed(lambda s=source: sum(1 for _ in plan([s], "text", TASK)), args.repeats)
            first = next(plan([source], "text", TASK))
            parse, _ = timed(lambda s=first: sum(1 for _ in read_span(s, "text")), args.repeats)
            print(
                f"{suffix}: {mb:.1f} MB, {records:,} records: main process before (decompress + parse) "
                f"{mb / before:.0f} MB/s, now (decompress + cut into {spans} spans) {mb / now:.0f} MB/s: "
                f"{before / now:.1f}x (decompressing in one call: {mb / floor:.0f} MB/s); a worker parses a span "
                f"at {len(first.data) / 1e6 / parse:.0f} MB/s (MB per CPU second)"
            )


if __name__ == "__main__":
    main()
