"""How long a training step is blocked by an asynchronous checkpoint save versus a synchronous one.

    .venv/bin/python bench/checkpoint_async.py [--repeats 5] [--after 5]

One process, Keel's trainer on the benchmark Llama (d256, 4 layers, batch 8 x 256). Each repeat takes
a synchronous save (the time inside `save`, commit record included) and an asynchronous one (the
time inside `save_async`, plus any wait for it to commit after `--after` more steps). Prints the
medians and their ratio, and how much slower those following steps ran while the write went on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import run_overrides, stdlib_dataset

from keel.config_toml import load_config
from keel.distributed.env import init_distributed
from keel.train.preflight import start_run
from keel.train.trainer import Trainer


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--after", type=int, default=5, help="steps trained while an async save is written")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, _ = start_run(load_config(None, run_overrides(stdlib_dataset(root), root / "run", steps=100_000)))
        trainer = Trainer(cfg, init_distributed("cpu"))
        ckpt, step = trainer.checkpointer, 0

        def train_step() -> float:
            nonlocal step
            step += 1
            return timed(trainer.train_step, step)

        for _ in range(3):  # warm-up
            train_step()
        baseline = statistics.median(train_step() for _ in range(5))
        sync, blocked, slowdown = [], [], []
        for _ in range(opts.repeats):
            train_step()
            sync.append(timed(ckpt.save, step))
            train_step()
            staged = timed(ckpt.save_async, step)
            during = sum(train_step() for _ in range(opts.after))
            blocked.append(staged + timed(ckpt.wait))  # waiting for the commit counts as blocked
            slowdown.append(during - opts.after * baseline)
        size = sum(f.stat().st_size for f in ckpt.latest().rglob("*") if f.is_file())
    s, a = statistics.median(sync), statistics.median(blocked)
    print(f"checkpoint {size / 1e6:.1f} MB, step {baseline * 1e3:.0f} ms (median), {opts.repeats} repeats")
    print(f"synchronous save blocks the step:  {s * 1e3:8.1f} ms (median)")
    print(f"asynchronous save blocks the step: {a * 1e3:8.1f} ms (median)")
    print(f"ratio async / sync: {a / s:.3f}")
    print(
        f"the {opts.after} steps during the async write took {statistics.median(slowdown) * 1e3:+.1f} ms in all "
        "(median; the writer shares the CPU)"
    )


if __name__ == "__main__":
    main()
