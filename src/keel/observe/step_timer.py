"""Where a step's time goes: data wait, forward, backward, optimizer, evaluation, checkpoint."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("data_wait", "forward", "backward", "optimizer", "eval", "checkpoint")
# Host work, timed by the wall clock on every device (evaluation and checkpoints end by copying to the host anyway).
HOST_PHASES = ("data_wait", "eval", "checkpoint")
MAX_PENDING = 512  # events kept unread between takes; past that, those already done are read (without waiting)


def cuda_event() -> Any:
    """A CUDA event that records its time on the current stream."""
    return torch.cuda.Event(enable_timing=True)


class StepTimer:
    """Accumulates time per phase. On CPU, and for host phases, by the wall clock; on CUDA, forward, backward and
    optimizer are bracketed by events on the stream (GPU time, never billed to a later phase that waits for it),
    read only when the metrics are taken, so no phase makes the host wait for the GPU."""

    def __init__(self, device: torch.device, event: Callable[[], Any] | None = None):
        # `event` makes an event with CUDA's interface (record, synchronize, elapsed_time in ms); CUDA's by default.
        self._event = event if event is not None else cuda_event if device.type == "cuda" else None
        self._pending: deque[tuple[str, Any, Any]] = deque()  # (phase, start, end) events not read yet
        self._totals: dict[str, float] = defaultdict(float)
        # Since the timer was made, never reset (the goodput ledger's); event phases count from the last take.
        self.totals: dict[str, float] = defaultdict(float)
        # What the loop is doing now and since when (wall time): read by the hang watchdog's thread.
        self.current, self.since = "starting", time.time()

    def mark(self, activity: str) -> None:
        """Say what the loop is doing now (outside the timed phases), for the hang watchdog."""
        self.current, self.since = activity, time.time()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as part of phase `name`."""
        if name not in PHASES:
            raise ValueError(f"unknown step phase {name!r}; known: {PHASES}")
        outside = self.current
        self.mark(name)
        if self._event is not None and name not in HOST_PHASES:
            start = self._event()
            start.record()
            try:
                yield
            finally:
                end = self._event()
                end.record()
                self._pending.append((name, start, end))
                if len(self._pending) > MAX_PENDING:
                    self._read_events(wait=False)
                self.mark(outside)
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - start_s)
            self.mark(outside)

    def _add(self, name: str, seconds: float) -> None:
        self._totals[name] += seconds
        self.totals[name] += seconds

    def _read_events(self, wait: bool = True) -> None:
        """Add pending phases' GPU time: all of them after waiting for the newest (once), or those already done."""
        if wait and self._pending:
            self._pending[-1][2].synchronize()
        while self._pending and (wait or self._pending[0][2].query()):
            name, start, end = self._pending.popleft()
            self._add(name, start.elapsed_time(end) / 1000)

    def take(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of every phase since the last take, as `<phase>_s` metrics; then reset."""
        self._read_events()
        means = {f"{name}_s": self._totals.get(name, 0.0) / max(steps, 1) for name in PHASES}
        self._totals.clear()
        return means
