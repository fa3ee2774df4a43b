"""Stragglers: every N steps the ranks exchange their timings, and a rank slower than the median is named."""

from __future__ import annotations

import logging
import socket
import statistics
import time
from collections.abc import Callable

import torch

from keel.callback import Callback, StepOutcome
from keel.distributed.env import DistEnv, all_gather_floats, all_gather_text
from keel.observe.step_timer import StepTimer

log = logging.getLogger("keel")

# Matmul side and count of the probe: a few milliseconds on either device, long enough to span scheduler slices.
PROBE = {"cuda": (4096, 25), "cpu": (384, 8)}


class StragglerWatch(Callback):
    """Compares the ranks' speeds every `every` steps and reports those slower than the median by `margin`.

    Step times alone cannot tell ranks apart: each collective makes the fast ranks wait for the slowest, so
    every rank reports the slowest rank's step time. Two per-rank signals no collective touches can: the
    time of a fixed matmul probe on the rank's device (a throttled or contended device) and the rank's own
    data wait (a slow input pipeline). A rank's slowdown is the larger of its probe time over the median
    probe and one plus its extra data wait over the median step time.
    """

    def __init__(self, every: int, margin: float, env: DistEnv, on_event: Callable[..., None], timer: StepTimer):
        self.every = every if env.distributed else 0  # one rank has no one to be slower than
        self.margin, self.rank, self.on_event = margin, env.rank, on_event
        side, self.repeats = PROBE["cuda" if env.device.type == "cuda" else "cpu"]
        self._cuda = env.device.type == "cuda"
        dtype = torch.bfloat16 if self._cuda else torch.float32
        generator = torch.Generator().manual_seed(0)
        self._a = torch.randn(side, side, generator=generator).to(env.device, dtype)
        self._b = torch.randn(side, side, generator=generator).to(env.device, dtype)
        self.hosts = all_gather_text(socket.gethostname()) if self.every else [socket.gethostname()]
        self.timer = timer
        self._window = (time.perf_counter(), 0.0, 0)  # since the last check: its time, data wait then, steps

    def due(self, step: int) -> bool:
        """Whether the ranks compare their speeds after this step (every rank must agree, and does)."""
        return self.every > 0 and step % self.every == 0

    def on_train_start(self, step: int) -> None:
        self._window = (time.perf_counter(), self.timer.totals["data_wait"], 0)

    def after_step(self, outcome: StepOutcome) -> None:
        """Count the step; on a due step, compare the ranks' timings since the last check and add the metrics."""
        started, waited, steps = self._window
        steps += 1
        self._window = (started, waited, steps)
        if self.due(outcome.step):
            step_time = (time.perf_counter() - started) / steps
            data_wait = (self.timer.totals["data_wait"] - waited) / steps
            outcome.values.update(self.check(outcome.step, step_time, data_wait))
            self._window = (time.perf_counter(), self.timer.totals["data_wait"], 0)

    def check(self, step: int, step_time_s: float, data_wait_s: float) -> dict[str, float]:
        """Exchange timings (a collective: every rank calls it), report stragglers, return the metrics."""
        rows = all_gather_floats([self.probe(), data_wait_s, step_time_s])
        probes, waits, steps = (list(column) for column in zip(*rows, strict=True))
        slowdowns = rank_slowdowns(probes, waits, steps)
        late = [r for r, (slowdown, _) in enumerate(slowdowns) if slowdown > 1 + self.margin]
        for r in late:
            slowdown, cause = slowdowns[r]
            self.on_event(
                "straggler",
                step=step,
                rank=r,
                rank_host=self.hosts[r],
                slowdown=round(slowdown, 3),
                cause=cause,
                probe_s=round(probes[r], 6),
                median_probe_s=round(statistics.median(probes), 6),
                data_wait_s=round(waits[r], 6),
                step_time_s=round(steps[r], 6),
            )
            if self.rank == 0:
                log.warning(
                    f"straggler at step {step}: rank {r} on {self.hosts[r]} is {slowdown:.2f}x the median ({cause})"
                )
        return {
            "rank_slowdown": slowdowns[self.rank][0],
            "straggler_slowdown": max(s for s, _ in slowdowns),
            "stragglers": len(late),
        }

    def probe(self) -> float:
        """Seconds this rank's device takes for a fixed set of matmuls; no collective is involved."""
        if self._cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(self.repeats):
            torch.mm(self._a, self._b)
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def rank_slowdowns(probes: list[float], waits: list[float], step_times: list[float]) -> list[tuple[float, str]]:
    """Each rank's (slowdown against the median, cause: "slow device" or "slow input") from its timings."""
    median_probe = max(statistics.median(probes), 1e-9)
    median_wait, median_step = statistics.median(waits), max(statistics.median(step_times), 1e-9)
    out = []
    for probe, wait in zip(probes, waits, strict=True):
        device, data = probe / median_probe, 1 + (wait - median_wait) / median_step
        out.append((device, "slow device") if device >= data else (data, "slow input"))
    return out
