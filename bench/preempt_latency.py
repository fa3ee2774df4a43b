"""Preemption latency: seconds from a SIGTERM to `keel train --nproc 2` until a checkpoint of the stop step is
committed, against one step plus one save of the same run (the bound: the signal waits for the step boundary).

Usage: .venv/bin/python bench/preempt_latency.py [--repeats 5] [--async-save]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_overrides, stdlib_dataset

from keel.config_toml import load_config, save_config
from keel.io import read_jsonl


def preempt_once(dataset: Path, run_dir: Path, async_save: bool, rng: random.Random) -> dict[str, float]:
    """Train, send SIGTERM at a random moment of a step after 12 recorded steps, and measure until the stop step's
    commit record exists (a step's metrics are written at its end, so the signal would otherwise always come at
    the start of a step: the worst case)."""
    overrides = [*run_overrides(dataset, run_dir, steps=100_000), "checkpoint.every=5", "observe.log_every=1"]
    overrides.append(f"checkpoint.async_save={'true' if async_save else 'false'}")
    config = run_dir.with_suffix(".toml")
    save_config(load_config(None, overrides), config)
    cmd = [sys.executable, "-m", "keel", "train", str(config), "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(read_jsonl(metrics)) >= 12):
        if proc.poll() is not None:
            raise SystemExit(f"the run exited with code {proc.returncode}; see {run_dir}/logs")
        time.sleep(0.01)
    records = read_jsonl(metrics)
    step_s = statistics.median(r["step_time_s"] for r in records[2:])
    time.sleep(rng.uniform(0, step_s))
    sent = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    status = json.loads((run_dir / "status.json").read_text())
    commit = run_dir / "checkpoints" / f"step_{status['step']}" / "commit.json"
    committed = json.loads(commit.read_text())
    saves = [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "checkpoint"]
    last = saves[-1]
    save_s = statistics.median(e["seconds"] for e in saves[:-1]) if len(saves) > 1 else saves[-1]["seconds"]
    return {
        "latency_s": committed["created_at"] - sent,
        "to_save_s": last["time"] - last["seconds"] - sent,  # waiting for the step boundary and agreeing
        "exit_s": time.time() - sent,
        "step_s": step_s,
        "save_s": save_s,
        "code": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--async-save", action="store_true", help="checkpoint.async_save = true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        rng = random.Random(0)
        runs = [preempt_once(dataset, root / f"run{i}", opts.async_save, rng) for i in range(opts.repeats)]
    for r in runs:
        print(
            f"signal -> commit {r['latency_s']:.2f} s (save began after {r['to_save_s']:.2f} s; exit "
            f"{r['exit_s']:.2f} s, code {r['code']}); "
            f"step {r['step_s']:.2f} s + save {r['save_s']:.2f} s = {r['step_s'] + r['save_s']:.2f} s"
        )
    latency = statistics.median(r["latency_s"] for r in runs)
    bound = statistics.median(r["step_s"] + r["save_s"] for r in runs)
    mode = "async" if opts.async_save else "sync"
    print(f"median signal -> committed checkpoint: {latency:.2f} s; one step + one save ({mode}): {bound:.2f} s")
    print(f"ratio latency / (step + save): {latency / bound:.2f}  (<= 1 means within the bound)")


if __name__ == "__main__":
    main()
