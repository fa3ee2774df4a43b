"""RUN_DIR/events.jsonl: the incidents of a run (start, resume, checkpoint, finish, ...), one JSON per line."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events; only the main rank writes, other ranks' calls are no-ops."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, kind: str, **fields: Any) -> None:
        """Record an event of `kind` with its fields, stamped with time and host."""
        if self.path is None:
            return
        record = {"time": round(time.time(), 3), "event": kind, "host": socket.gethostname(), **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
