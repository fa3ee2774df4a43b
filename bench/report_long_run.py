"""The report of a long run: time to write it against the time to parse its metrics, and the page's size.

    .venv/bin/python bench/report_long_run.py [--steps 100000] [--repeats 3]

A synthetic run dir shaped like a real one: every step records what `keel train` records (loss, lr, gradient
norm and 12 per-group norms, throughput, MFU, step-time phases, memory, checkpoint age, goodput ratio), a
validation every 500 steps, a checkpoint and goodput record every 1,000, a straggler report every 50 and a
restart every 25,000. Baseline: reading metrics.jsonl (the least any report of the run must do). Prints the
medians, their ratio and the page's size.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from keel.io import read_jsonl
from keel.observe.report import render
from keel.resilience.goodput import CATEGORIES

GROUPS = [
    f"layers.{part}"
    for part in (
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    )
]
GROUPS += ["norm", "output", "tok_embeddings"]


def synthetic_run(root: Path, steps: int) -> Path:
    """Write config.toml, metrics.jsonl and events.jsonl of a run of `steps` steps; return the run dir."""
    rng = random.Random(0)
    run = root / "run"
    run.mkdir()
    (run / "config.toml").write_text(
        '[model]\nname = "llama"\ndim = 256\nn_layers = 4\nn_heads = 4\nn_kv_heads = 2\nvocab_size = 8192\n'
        f"[train]\nsteps = {steps}\nseq_len = 256\nglobal_batch_size = 8\n"
    )
    t, events = 1.8e9, []
    with open(run / "metrics.jsonl", "w") as metrics:
        for step in range(1, steps + 1):
            t += 0.3 + 0.05 * rng.random()
            if step % 25_000 == 0:
                t += 60
                events.append({"time": t - 1, "event": "start", "step": step - 1, "world_size": 8, "device": "cuda"})
            phases = {p: 0.3 * rng.random() / 5 for p in ("data_wait_s", "forward_s", "backward_s", "optimizer_s")}
            record = {
                "step": step,
                "time": t,
                "loss": 2 + 7 * math.exp(-step / 8000) + 0.1 * rng.random(),
                "lr": 3e-4 * min(1, step / 2000),
                "grad_norm": 0.5 + rng.random(),
                "tokens_per_s": 6800 + 300 * rng.random(),
                "tokens_per_s_rank": 850 + 40 * rng.random(),
                "tokens_seen": step * 2048.0,
                "step_time_s": 0.3,
                "eta_s": (steps - step) * 0.3,
                "mfu": 0.41,
                "memory_rss_gb": 12.5,
                "memory_cuda_peak_gb": 61.2,
                "checkpoint_age_s": (step % 1000) * 0.3,
                "goodput_ratio": 0.93,
                "eval_s": 0.0,
                "checkpoint_s": 0.0,
                **phases,
                **{f"grad_norm/{g}": 10 ** rng.uniform(-4, 0) for g in GROUPS},
            }
            if step % 500 == 0:
                record["val_loss"] = record["loss"] + 0.05
            metrics.write(json.dumps(record) + "\n")
            if step % 50 == 0:
                events.append(
                    {
                        "time": t,
                        "event": "straggler",
                        "step": step,
                        "rank": 3,
                        "rank_host": "n1",
                        "slowdown": 1.3,
                        "cause": "slow device",
                    }
                )
            if step % 1000 == 0:
                events.append(
                    {
                        "time": t,
                        "event": "goodput",
                        "step": step,
                        "ratio": 0.93,
                        **{c: step * 0.3 * (0.93 if c == "productive" else 0.01) for c in CATEGORIES},
                    }
                )
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in sorted(events, key=lambda e: e["time"])))
    return run


def median_seconds(work, repeats: int) -> float:
    """The median wall time of `work()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp), args.steps)
        render(run)  # warm-up: imports (the model registry, torch) stay out of the timing
        parse = median_seconds(lambda: read_jsonl(run / "metrics.jsonl"), args.repeats)
        report = median_seconds(lambda: render(run), args.repeats)
        size = len(render(run).encode())
        megabytes = (run / "metrics.jsonl").stat().st_size / 1e6
    print(f"{args.steps:,} steps, metrics.jsonl {megabytes:.0f} MB")
    print(f"parse metrics.jsonl (baseline): {parse:.2f} s median of {args.repeats}")
    print(f"keel report:                    {report:.2f} s median of {args.repeats}")
    print(f"report / parse: {report / parse:.2f}; page {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
