"""RUN_DIR/status.json, the heartbeat: what the run is doing now, readable by people and tools."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from keel.checkpoint.commit import atomic_write_text, committed_steps

STATUS_FILE = "status.json"
# States a run writes itself; "stalled" is only ever inferred by a reader from an old heartbeat.
RUN_STATES = ("starting", "running", "finished", "stopped", "crashed")


class StatusSink:
    """A metrics sink that rewrites status.json on every record, so its age is the heartbeat's age."""

    def __init__(self, run_dir: Path, total_steps: int):
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self._status: dict[str, Any] = {"state": "starting", "step": 0, "total_steps": total_steps}
        self._write()

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        self._status.update(state="running", step=step)
        for key in ("loss", "val_loss", "tokens_per_s", "eta_s"):
            if key in values:
                self._status[key] = values[key]
        self._write()

    def close(self) -> None:
        pass

    def _write(self) -> None:
        write_status(self.run_dir, self._status)


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    """Write status.json atomically, stamped with the time, host, process id and newest committed checkpoint."""
    steps = committed_steps(Path(run_dir) / "checkpoints")
    record = {
        **status, "last_checkpoint_step": steps[-1] if steps else None,
        "updated_at": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
    }
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=1))


def mark_state(run_dir: Path, state: str, **fields: Any) -> None:
    """Set the run's state (finished, stopped, crashed, ...) keeping the rest of its last heartbeat."""
    if state not in RUN_STATES:
        raise ValueError(f"unknown run state {state!r}")
    write_status(run_dir, {**read_status(run_dir), "state": state, **fields})


def read_status(run_dir: Path) -> dict[str, Any]:
    """The last heartbeat of a run, or {} if it has none (or a torn one from another writer)."""
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
