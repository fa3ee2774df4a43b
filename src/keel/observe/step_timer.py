"""Where a step's time goes: data wait, forward, backward, optimizer, evaluation, checkpoint."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("data_wait", "forward", "backward", "optimizer", "eval", "checkpoint")


class StepTimer:
    """Accumulates wall time per phase; on CUDA each phase ends with a synchronize, so GPU work is not
    billed to whichever later phase happens to wait for it."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self.totals: dict[str, float] = defaultdict(float)  # since the timer was made, never reset (the ledger's)
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
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            self._totals[name] += elapsed
            self.totals[name] += elapsed
            self.mark(outside)

    def take(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of every phase since the last take, as `<phase>_s` metrics; then reset."""
        means = {f"{name}_s": self._totals.get(name, 0.0) / max(steps, 1) for name in PHASES}
        self._totals.clear()
        return means
