"""Shared set-up for the benchmarks: a small real dataset and a small Llama config."""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

from keel.data.prepare import prepare_dataset

MODEL = {"name": "llama", "dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256}


def stdlib_dataset(root: Path) -> Path:
    """Prepare the stdlib's email and json packages (about 1 MB of real Python) into root/data."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = root / "data"
    sources = [str(stdlib / "email" / "**" / "*.py"), str(stdlib / "json" / "*.py")]
    prepare_dataset(sources, out, vocab_size=8192, val_fraction=0.05, log=lambda m: None)
    return out


def run_overrides(dataset: Path, run_dir: Path, steps: int, precision: str = "fp32") -> list[str]:
    """`--set` overrides for a run of the benchmark model on `dataset`, batch 8 x 256."""
    return [
        *(f"model.{k}={json.dumps(v)}" for k, v in MODEL.items()),
        f"data.dataset={json.dumps(str(dataset))}",
        f"run.dir={json.dumps(str(run_dir))}",
        f"train.steps={steps}",
        "train.seq_len=256",
        "train.global_batch_size=8",
        "train.eval_every=0",
        f"train.precision={precision!r}",
        "checkpoint.every=0",
        "observe.console=false",
        "observe.tensorboard=false",
    ]


class Clock:
    """Wall time and this process's CPU time since it was made; the second is what other jobs' load inflates least."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, tokens: int) -> tuple[float, float]:
        """tokens per second of wall time and per second of CPU time (all threads)."""
        return tokens / (time.perf_counter() - self.wall), tokens / (time.process_time() - self.cpu)
