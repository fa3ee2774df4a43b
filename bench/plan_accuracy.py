"""`keel plan` against real CPU runs: predicted vs measured step time and peak resident memory, per config.

    .venv/bin/python bench/plan_accuracy.py [--steps 12] [--repeats 2]

Each config trains with `keel train` (its own processes, as a user runs it); the plan is the one the run records in
its `plan` event at start (its start-up RSS and matmul ceiling, measured in the worker). Prints, per config, the
medians over repeats of planned and measured step time (median of the logged steps after the first two) and peak
RSS (rank 0's high-water mark), their ratios, the planned tensors' peak, and the resident memory beyond the framework
and those tensors (what the plan's allocator term stands for).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import stdlib_dataset

from keel.config_toml import dump_toml

# (name, [model] keys, batch, seq_len, processes): the demo's model and layout, and wider ones.
CONFIGS = [
    ("demo d256 L4, 1 process", {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}, 16, 256, 1),
    ("demo d256 L4, FSDP 2 processes", {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}, 16, 256, 2),
    ("wide d512 L4, 1 process", {"dim": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4}, 8, 256, 1),
    (
        "wide d768 L6, vocab 16384",
        {"dim": 768, "n_layers": 6, "n_heads": 12, "n_kv_heads": 4, "vocab_size": 16384},
        8,
        256,
        1,
    ),
]


def run(root: Path, dataset: Path, name: str, model: dict, batch: int, seq: int, nproc: int, steps: int) -> dict:
    """Train one config; returns its plan event and its measured step time and peak RSS."""
    run_dir = root / name.split(",")[0].replace(" ", "_") / str(len(list(root.glob("*/*"))))
    config = run_dir.with_suffix(".toml")
    config.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "run": {"dir": str(run_dir)},
        "model": {"name": "llama", "vocab_size": 8192, "max_seq_len": seq, **model},
        "data": {"dataset": str(dataset)},
        "train": {"steps": steps, "seq_len": seq, "global_batch_size": batch, "eval_every": 0, "precision": "fp32"},
        "parallel": {"nproc": nproc},
        "checkpoint": {"every": 0},
        "observe": {"log_every": 1, "tensorboard": False, "console": False},
    }
    config.write_text(dump_toml(table), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    subprocess.run([sys.executable, "-m", "keel", "train", str(config)], check=True, env=env, capture_output=True)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e["event"] == "plan")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_s = [r["step_time_s"] for r in records if "step_time_s" in r][2:]
    return {
        "plan": plan,
        "step_s": statistics.median(steps_s),
        "rss_gb": max(r["memory_rss_peak_gb"] for r in records if "memory_rss_peak_gb" in r),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'config':34} {'step plan':>9} {'measured':>9} {'ratio':>6} {'RSS plan':>9} {'measured':>9} {'ratio':>6}")
    print(f"{'':34} {'(s)':>9} {'(s)':>9} {'':>6} {'(GB)':>9} {'(GB)':>9} {'':>6} tensors (GB)  beyond (GB)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        for name, model, batch, seq, nproc in CONFIGS:
            runs = [run(root, dataset, name, model, batch, seq, nproc, opts.steps) for _ in range(opts.repeats)]
            planned_s = statistics.median(r["plan"]["step_time_s"] for r in runs)
            measured_s = statistics.median(r["step_s"] for r in runs)
            planned_gb = statistics.median(r["plan"]["peak_memory_gb"] for r in runs)
            measured_gb = statistics.median(r["rss_gb"] for r in runs)
            plan = runs[0]["plan"]
            tensors = plan["peak_memory_gb"] - plan["breakdown_framework_gb"] - plan["breakdown_allocator_gb"]
            beyond = measured_gb - plan["breakdown_framework_gb"] - tensors
            print(
                f"{name:34} {planned_s:9.3f} {measured_s:9.3f} {measured_s / planned_s:6.2f} {planned_gb:9.3f}"
                f" {measured_gb:9.3f} {measured_gb / planned_gb:6.2f} {tensors:12.3f} {beyond:12.3f}"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
