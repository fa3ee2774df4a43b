"""The cost of watching: step time with every sink on against every sink off, in one run.

    .venv/bin/python bench/observe_overhead.py [--steps 30] [--repeats 3]

"On": console, metrics.jsonl, status.json, TensorBoard and Prometheus, recorded every step (with the per-group
gradient norms a record carries). "Off": nothing recorded until the last step. Prints the median of each and the
overhead ratio; the sinks' one-off closing at the end of a run is timed apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from common import run_overrides, stdlib_dataset

from keel.config_toml import load_config
from keel.distributed.env import init_distributed
from keel.train.preflight import start_run
from keel.train.trainer import Trainer

ALL_ON = ["observe.log_every=1", "observe.console=true", "observe.tensorboard=true", "observe.prometheus=true"]


def fit_seconds_per_step(dataset: Path, run_dir: Path, steps: int, observe: list[str]) -> tuple[float, float]:
    """Seconds per training step of fit(), and the seconds its sinks took to close at the end (not per step)."""
    cfg, _ = start_run(load_config(None, [*run_overrides(dataset, run_dir, steps), *observe]))
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.train_step(0)  # warm-up outside the timing; fit() starts again from step 1
    trainer.state.step = 0
    close, closing = trainer.metrics.close, []

    def timed_close() -> None:
        start = time.perf_counter()
        close()
        closing.append(time.perf_counter() - start)

    trainer.metrics.close = timed_close
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    return (time.perf_counter() - start - closing[0]) / steps, closing[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    on, off, closing = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        for i in range(opts.repeats):
            off.append(
                fit_seconds_per_step(dataset, root / f"off{i}", opts.steps, [f"observe.log_every={opts.steps}"])[0]
            )
            port = [f"observe.prometheus_port={19400 + i}"]
            per_step, closed = fit_seconds_per_step(dataset, root / f"on{i}", opts.steps, ALL_ON + port)
            on.append(per_step)
            closing.append(closed)
    a, b = statistics.median(on), statistics.median(off)
    print(f"all sinks on : {a * 1000:.1f} ms/step (median of {opts.repeats}; runs: {_ms(on)})")
    print(f"all sinks off: {b * 1000:.1f} ms/step (median of {opts.repeats}; runs: {_ms(off)})")
    print(f"overhead ratio on / off: {a / b:.4f}  ({(a / b - 1) * 100:+.2f}%)")
    print(f"closing every sink at the end of a run (once, not per step): {statistics.median(closing) * 1000:.0f} ms")


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values)


if __name__ == "__main__":
    main()
