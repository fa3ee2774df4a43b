"""Profiling on demand: torch.profiler traces (and CUDA memory snapshots) for configured step ranges."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from keel.callback import Callback, StepOutcome
from keel.rundir import RunDir

log = logging.getLogger("keel")


class StepProfiler(Callback):
    """Profiles the steps of each [first, last] range into RUN_DIR/profiles/, one trace per rank and range."""

    def __init__(self, ranges: list[list[int]], run_dir: Path, rank: int, device: torch.device):
        self.ranges = sorted((first, last) for first, last in ranges)
        self.out = RunDir(run_dir).profiles
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._active: profile | None = None

    def before_step(self, step: int) -> None:
        """Start profiling if `step` opens a range."""
        if self._active is None and any(first == step for first, _ in self.ranges):
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._active = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._active.start()
            if self.cuda:
                torch.cuda.memory._record_memory_history(max_entries=100_000)

    def after_step(self, outcome: StepOutcome) -> None:
        """Stop and write the trace (and the CUDA memory snapshot) if the step closes a range."""
        step = outcome.step
        if self._active is None:
            return
        ranges = [r for r in self.ranges if r[1] == step and r[0] <= step]
        if not ranges:
            return
        first, last = ranges[0]
        self._active.stop()
        self.out.mkdir(parents=True, exist_ok=True)
        trace = self.out / f"trace_steps{first}-{last}_rank{self.rank}.json"
        self._active.export_chrome_trace(str(trace))
        self._active = None
        if self.cuda:
            snapshot = self.out / f"memory_steps{first}-{last}_rank{self.rank}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info(f"profiled steps {first}-{last}: {trace} (open in https://ui.perfetto.dev or chrome://tracing)")
