"""A run's start, end and failure, as events.jsonl records and the heartbeat's final state."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from keel.callback import Callback, LoopControl
from keel.distributed.env import DistEnv
from keel.observe.events import EventLog
from keel.observe.heartbeat import mark_failed, mark_state
from keel.observe.metrics import Metrics


class RunLifecycle(Callback):
    """Records start, finish or stop, and failures; closes the metrics sinks; sets status.json's final state."""

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        events: EventLog,
        metrics: Metrics,
        control: LoopControl,
        progress: Callable[[], tuple[int, int]],
        precision: str,
    ):
        self.run_dir, self.env, self.events, self.metrics = run_dir, env, events, metrics
        self.control, self.progress, self.precision = control, progress, precision

    def on_train_start(self, step: int) -> None:
        device = str(self.env.device)
        self.events("start", step=step, world_size=self.env.world_size, device=device, precision=self.precision)

    def on_exit(self, state: str) -> None:
        step, tokens_seen = self.progress()
        if state == "finished":
            self.events("finish", step=step, tokens_seen=tokens_seen)
        else:
            self.events("stop", step=step, reason=self.control.stop_reason)
        self.metrics.close()  # flushes the last heartbeat, which the final state below keeps
        if self.env.is_main:
            mark_state(self.run_dir, state, step=step, reason=self.control.stop_reason)

    def on_error(self, error: BaseException) -> None:
        self.metrics.close()
        if self.env.is_main:
            mark_failed(self.run_dir, error)
