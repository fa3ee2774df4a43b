"""Pipeline parallel against FSDP on two processes: tokens/s of `keel train` on the benchmark Llama, batch 8 x 256,
per layout, as ratios against FSDP (dp_shard 2) measured in the same run.

    .venv/bin/python bench/pipeline.py [--steps 12] [--repeats 2]

Each layout is a real `keel train --nproc 2` run; a run's step time is the median over its steps after the
second (start-up and the schedule's first-step shape inference excluded); layouts alternate across repeats, so
a noisy neighbour slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MODEL, run_overrides, stdlib_dataset

PP, M8 = "parallel.pp=2", "parallel.pp_microbatches=8"
LAYOUTS = {
    "fsdp (dp_shard 2)": [],
    "pp 2, 1f1b, 2 micro-batches": [PP, "parallel.pp_microbatches=2"],
    "pp 2, 1f1b, 8 micro-batches": [PP, M8],
    "pp 2, gpipe, 8 micro-batches": [PP, M8, "parallel.pp_schedule='gpipe'"],
    "pp 2, interleaved 2/rank, 8": [PP, M8, "parallel.pp_schedule='interleaved_1f1b'"],
}


def step_time(root: Path, dataset: Path, name: str, settings: list[str], steps: int, index: int) -> float:
    run = root / f"run{index}"
    overrides = [*run_overrides(dataset, run, steps), "observe.log_every=1", *settings]
    config = root / "bench.toml"
    config.touch()  # every key comes from the overrides
    flags = [a for o in overrides for a in ("--set", o)]
    args = [sys.executable, "-m", "keel", "train", str(config), "--nproc", "2", *flags]
    result = subprocess.run(args, cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name}: keel train failed: {result.stderr.strip()}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in records if r["step"] > 2 and "step_time_s" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        index = 0
        for _ in range(opts.repeats):
            for name, settings in LAYOUTS.items():
                times[name].append(step_time(root, dataset, name, settings, opts.steps, index))
                index += 1
    tokens = 8 * 256
    base = statistics.median(times["fsdp (dp_shard 2)"])
    print(f"Llama d{MODEL['dim']} L{MODEL['n_layers']}, batch 8 x 256, fp32, 2 processes (gloo)")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"{name:32} {tokens / t:8.0f} tokens/s   step {t * 1000:7.1f} ms ({base / t:.2f}x FSDP's tokens/s)")


if __name__ == "__main__":
    main()
