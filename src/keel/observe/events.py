"""RUN_DIR/events.jsonl: the incidents of a run (start, resume, checkpoint, finish, ...), one JSON per line."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class EventLog:
    """Appends events: the run's story is told by the main rank; incidents (a hang, a fault) by any rank."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = path, main

    def __call__(self, kind: str, /, **fields: Any) -> None:
        """Record an event of `kind` with its fields, stamped with time and host (main rank only)."""
        if self.main:
            self.incident(kind, **fields)

    def incident(self, kind: str, /, **fields: Any) -> None:
        """Record an event from whichever rank calls (one write of one line, so ranks never interleave)."""
        record = {"time": round(time.time(), 3), "event": kind, "host": socket.gethostname(), **fields}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
