"""Metric sinks: the console progress line, RUN_DIR/metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TextIO

from keel.config import Config
from keel.distributed.env import DistEnv
from keel.io import atomic_write_text, jsonl_lines
from keel.observe.heartbeat import StatusSink
from keel.rundir import RunDir
from keel.units import duration


class JsonlSink:
    """Appends one JSON object per record to metrics.jsonl: {"step", "time", "<name>": value, ...}."""

    def __init__(self, path: Path):
        self.path = path
        self._file: TextIO | None = None  # opened on first write, after a resume has rewound the file

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"step": step, "time": round(time, 3), **values}) + "\n")
        self._file.flush()

    def rewind(self, step: int) -> int:
        """Move the records after `step` to metrics.rolled_back.jsonl; the next write appends to the rest."""
        self.close()
        return rewind_jsonl(self.path, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def rewind_jsonl(path: Path, step: int) -> int:
    """Drop records after `step` (from an attempt that died after its last checkpoint) from a metrics file.

    The dropped lines are appended to `<name>.rolled_back.jsonl` beside it, so nothing written is lost;
    returns how many were moved.
    """
    keep, drop = [], []
    for line, record in jsonl_lines(path):
        # A line torn by a kill mid-write belongs to the dead attempt.
        (drop if record is None or record.get("step", 0) > step else keep).append(line)
    if drop:
        with open(path.with_suffix(".rolled_back.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(drop)
        atomic_write_text(path, "".join(keep))
    return len(drop)


class TensorBoardSink:
    """Scalars to TensorBoard event files in RUN_DIR/tb/."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when the sink is on

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._writer.add_scalar(name, value, step, walltime=time)

    def close(self) -> None:
        self._writer.close()


# How people read each number: the console line and `keel status` share these.
FORMATS = {
    "loss": lambda v: f"loss {v:.4f}",
    "val_loss": lambda v: f"val_loss {v:.4f}",
    "lr": lambda v: f"lr {v:.2e}",
    "tokens_per_s": lambda v: f"{v:,.0f} tok/s",
    "mfu": lambda v: f"MFU {100 * v:.1f}%",
}


def format_metrics(values: dict[str, float], names: tuple[str, ...] = tuple(FORMATS)) -> list[str]:
    """The human-readable form of those of `names` that `values` holds, in that order."""
    return [FORMATS[name](values[name]) for name in names if name in values]


class ConsoleSink:
    """One progress line per record: step, loss, lr, tokens/s, MFU, memory, ETA."""

    def __init__(self, total_steps: int, logger: logging.Logger | None = None):
        self.total_steps = total_steps
        self._log = logger or logging.getLogger("keel")

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        parts = [f"step {step}/{self.total_steps}", *format_metrics(values)]
        memory = values.get("memory_cuda_peak_gb", values.get("memory_rss_gb"))
        if memory is not None:
            parts.append(f"mem {memory:.2f} GB")
        if "eta_s" in values:
            parts.append(f"ETA {duration(values['eta_s'])}")
        self._log.info(" | ".join(parts))

    def close(self) -> None:
        pass


def build_sinks(cfg: Config, run_dir: Path, env: DistEnv) -> list:
    """The sinks `observe.*` turns on: run-dir files, console, TensorBoard, W&B on rank 0; Prometheus on every rank."""
    sinks: list = []
    run = RunDir(run_dir)
    if env.is_main:
        sinks += [JsonlSink(run.metrics), StatusSink(run_dir, cfg.train.steps, cfg.observe.heartbeat_s)]
        if cfg.observe.console:
            sinks.append(ConsoleSink(cfg.train.steps))
        if cfg.observe.tensorboard:
            sinks.append(TensorBoardSink(run.tensorboard))
        if cfg.observe.wandb:
            from keel.observe.wandb_sink import WandbSink

            sinks.append(WandbSink(run_dir, cfg.run.name, cfg.observe.wandb_project, cfg.model_dump(mode="json")))
    if cfg.observe.prometheus:
        from keel.observe.prometheus import PrometheusSink

        port = cfg.observe.prometheus_port + env.local_rank
        sinks.append(PrometheusSink(cfg.run.name, env.rank, cfg.observe.prometheus_host, port))
    return sinks
