"""RUN_DIR/status.json, the heartbeat: what the run is doing now, readable by people and tools."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from keel.checkpoint.commit import committed_steps
from keel.io import atomic_write_json, first_line
from keel.rundir import RunDir

# States a run writes itself; "stalled" is only ever inferred by a reader from an old heartbeat.
RUN_STATES = ("starting", "running", "finished", "stopped", "preempted", "crashed")


class StatusSink:
    """A metrics sink that rewrites status.json from its records, at most once per `interval_s`.

    Only records write it, so its age is the age of the training loop's last sign of life; the interval keeps
    the atomic, fsynced rewrite off the per-step path (a stall timeout is minutes, the interval seconds).
    """

    def __init__(self, run_dir: Path, total_steps: int, interval_s: float = 10.0):
        self.run_dir = Path(run_dir)
        self.interval_s = interval_s
        self._status: dict[str, Any] = {"state": "starting", "step": 0, "total_steps": total_steps}
        self._written_at = 0.0
        self._write()

    def write(self, step: int, time_: float, values: dict[str, float]) -> None:
        starts = self._status["state"] != "running"
        self._status.update(state="running", step=step)
        for key in ("loss", "val_loss", "tokens_per_s", "eta_s"):
            if key in values:
                self._status[key] = values[key]
        if starts or time.monotonic() - self._written_at >= self.interval_s:
            self._write()

    def close(self) -> None:
        self._write()  # the last record, so a final state marked later keeps the last loss and step

    def _write(self) -> None:
        write_status(self.run_dir, self._status)
        self._written_at = time.monotonic()


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Write status.json atomically, stamped with the time, host, process id and newest committed checkpoint."""
    run = RunDir(run_dir)
    steps = committed_steps(run.checkpoints)
    record = {
        **status,
        "last_checkpoint_step": steps[-1] if steps else None,
        "updated_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    atomic_write_json(run.status, record)


def mark_state(run_dir: Path, state: str, **fields: Any) -> None:
    """Set the run's state (finished, stopped, crashed, ...) keeping the rest of its last heartbeat."""
    if state not in RUN_STATES:
        raise ValueError(f"unknown run state {state!r}")
    write_status(run_dir, {**read_status(run_dir), "state": state, **fields})


def mark_failed(run_dir: Path, error: BaseException) -> None:
    """Say why the run ended, or it would only look stalled later: stopped on Ctrl-C, else crashed with the error."""
    if isinstance(error, KeyboardInterrupt):
        mark_state(run_dir, "stopped", reason="interrupted")
    else:
        mark_state(run_dir, "crashed", error=first_line(error))


def read_status(run_dir: Path) -> dict[str, Any]:
    """The last heartbeat of a run, or {} if it has none (or a torn one from another writer)."""
    try:
        status = json.loads(RunDir(run_dir).status.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return status if isinstance(status, dict) else {}
