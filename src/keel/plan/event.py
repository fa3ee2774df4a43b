"""The plan of a run, recorded as a `plan` event when training starts, for `keel report` to compare with."""

from __future__ import annotations

from keel.callback import Callback
from keel.observe.events import EventLog
from keel.plan.planner import Plan


class PlanEvent(Callback):
    """Records the run's plan (memory per rank, step time, MFU, totals) at every start, resumes included."""

    def __init__(self, plan: Plan, events: EventLog):
        self.plan, self.events = plan, events

    def on_train_start(self, step: int) -> None:
        self.events("plan", step=step, **self.plan.summary())
