"""The goodput ledger: every second of a run's wall time, across restarts, resumes and rollbacks, in a category.

productive   the loop itself: forward, backward, optimizer and the capabilities' own time
data_wait    steps waiting for their batch
eval         validation
checkpoint   time a save blocked training
startup      from a launch, or a failure, to the first step: start-up, restart detection and restart
lost         work done after the last checkpoint and thrown away by a restart or a rollback (recomputed)
idle         between a run's graceful end (preemption, stop) and its next launch

The ledger is in every checkpoint, so a resumed run continues its totals; what happened between the
checkpoint it resumes and its own start is read from events.jsonl and metrics.jsonl. The goodput ratio is
productive time over the time the run held its machines (everything but idle).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.callback import Callback, StepOutcome
from keel.errors import KeelError
from keel.io import read_jsonl
from keel.observe.events import EventLog
from keel.observe.step_timer import StepTimer
from keel.rundir import RunDir

CATEGORIES = ("productive", "data_wait", "eval", "checkpoint", "startup", "lost", "idle")
TIMED = {"data_wait": "data_wait", "eval": "eval", "checkpoint": "checkpoint"}  # ledger category: timer phase
ENDINGS = {"stop", "finish"}  # events after which a run is not running (a gap after them is idle)


def goodput_ratio(totals: dict[str, float]) -> float:
    """Productive seconds over the seconds the run held its machines (all but idle)."""
    held = sum(totals.values()) - totals.get("idle", 0.0)
    return totals.get("productive", 0.0) / held if held > 0 else 0.0


@dataclass(frozen=True)
class Attempt:
    """What earlier attempts left in the run dir: when they began and last showed life, how they ended."""

    first: float
    last: float
    graceful: bool


def earlier_attempts(run: RunDir) -> Attempt | None:
    """The run's activity recorded so far (read before this attempt records any), or None if there is none."""
    events = read_jsonl(run.events)
    times = [e["time"] for e in events] + [r["time"] for r in read_jsonl(run.metrics)]
    if not times:
        return None
    endings = [e for e in events if e.get("event") in ENDINGS | {"start", "resume"}]
    graceful = bool(endings) and endings[-1]["event"] in ENDINGS
    return Attempt(min(times), max(times), graceful)


def launch_time() -> float:
    """When this attempt was launched: `keel train`'s clock for a first attempt, else this process's start."""
    launched = os.environ.get("KEEL_LAUNCH_TIME")
    if launched and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return float(launched)
    return process_started_at()


def process_started_at() -> float:
    """The wall time this process started (Linux; elsewhere, now): its age from /proc, to the clock tick.

    psutil's create_time rests on a boot time rounded to the second, too coarse to order events by.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))


class GoodputLedger(Callback):
    """Accounts the wall time of every step, save and evaluation; reports it as events and a metric."""

    def __init__(self, run: RunDir, events: EventLog, timer: StepTimer):
        self.run, self.events, self.timer = run, events, timer
        self.totals = dict.fromkeys(CATEGORIES, 0.0)
        self.launched_at = launch_time()
        self.earlier = earlier_attempts(run)  # now, before this attempt writes its own events
        self._mark: float | None = None  # wall time up to which everything is accounted
        self._timed: dict[str, float] = {}
        self._restored_at: float | None = None  # when the checkpoint a resume or restart loaded was taken
        self._step = 0

    def on_train_start(self, step: int) -> None:
        now = time.time()
        before = self.earlier
        start = self.launched_at
        if before is not None:
            if self._restored_at is not None:  # work after the checkpoint died with the attempt that did it
                self.totals["lost"] += max(0.0, before.last - self._restored_at)
            else:  # no checkpoint survived: every earlier second is lost
                self.totals["lost"] += before.last - before.first
            if before.graceful:
                self.totals["idle"] += max(0.0, self.launched_at - before.last)
            else:
                start = min(start, before.last)  # from the failure on, it is all restart
        self.totals["startup"] += max(0.0, now - start)
        self._reset(now)
        self._step = step

    def after_step(self, outcome: StepOutcome) -> None:
        self._account()
        self._step = outcome.step
        if outcome.values and not outcome.discarded:
            outcome.values["goodput_ratio"] = goodput_ratio(self.totals)

    def on_checkpoint(self, step: int, path: Any) -> None:
        self._report(step)

    def on_exit(self, state: str) -> None:
        self._account()
        self._report(self._step, final=state)

    def on_error(self, error: BaseException) -> None:
        if self._mark is not None:
            self._account()
            self._report(self._step, final="error")

    def state_dict(self) -> dict[str, float]:
        """The totals up to this moment (a save) and the moment itself."""
        if self._mark is not None:
            self._account()
        return {**self.totals, "at": self._mark or time.time()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue the totals of a checkpoint; inside a running loop (a rollback) the time since it is lost."""
        self.totals = {name: float(state[name]) for name in CATEGORIES}
        if self._mark is None:
            self._restored_at = float(state["at"])
            return
        now = time.time()
        self.totals["lost"] += max(0.0, now - float(state["at"]))
        self._reset(now)

    def _account(self) -> None:
        now = time.time()
        spent = {name: self.timer.totals[phase] - self._timed.get(phase, 0.0) for name, phase in TIMED.items()}
        for name, seconds in spent.items():
            self.totals[name] += seconds
        self.totals["productive"] += max(0.0, now - self._mark - sum(spent.values()))
        self._reset(now)

    def _reset(self, now: float) -> None:
        self._mark = now
        self._timed = {phase: self.timer.totals[phase] for phase in TIMED.values()}

    def _report(self, step: int, final: str | None = None) -> None:
        fields = {name: round(seconds, 3) for name, seconds in self.totals.items()}
        extra = {"final": final} if final else {}
        self.events("goodput", step=step, ratio=round(goodput_ratio(self.totals), 4), **fields, **extra)


@dataclass(frozen=True)
class RunLedger:
    """A run's ledger as its events tell it: the newest record's totals and what happened since."""

    totals: dict[str, float]
    since_s: float  # seconds of activity after the newest record (unsaved work, or lost if the run is gone)
    final: str | None  # how the run ended, if the newest record was its last
    records: list[dict[str, Any]]  # every goodput record, oldest first (for the timeline)


def run_ledger(run: RunDir) -> RunLedger:
    """The ledger of a run dir, from its goodput events; a KeelError if it has none yet."""
    ledger = ledger_of(read_jsonl(run.events), read_jsonl(run.metrics)[-1:])
    if ledger is None:
        raise KeelError(f"{run.root}: no goodput records yet; a run writes them at every checkpoint and when it ends")
    return ledger


def ledger_of(events: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> RunLedger | None:
    """The ledger told by a run's events and metrics records already read (the newest suffices), or None."""
    records = [e for e in events if e.get("event") == "goodput"]
    if not records:
        return None
    last = records[-1]
    latest = max([e["time"] for e in events] + [r["time"] for r in metrics[-1:]])
    totals = {name: float(last.get(name, 0.0)) for name in CATEGORIES}
    return RunLedger(totals, max(0.0, latest - last["time"]), last.get("final"), records)


def ledger_lines(run: RunDir, running: bool) -> list[str]:
    """`keel goodput`: the table of categories, their shares, and the goodput ratio."""
    ledger = run_ledger(run)
    totals = dict(ledger.totals)
    if ledger.final is None and ledger.since_s > 0 and not running:
        totals["lost"] += ledger.since_s  # work after the newest checkpoint of a run that is gone
    held = sum(totals.values()) - totals["idle"]
    lines = [
        f"{run.root}: goodput {goodput_ratio(totals):.1%} "
        f"({totals['productive']:,.1f} s productive of {held:,.1f} s on its machines; idle not counted)"
    ]
    for name in CATEGORIES:
        share = f"{totals[name] / held:6.1%}" if held > 0 and name != "idle" else "      "
        lines.append(f"  {name:<11} {totals[name]:>12,.1f} s  {share}")
    if ledger.final is None and ledger.since_s > 0:
        kind = "running since, not yet in a checkpoint" if running else "counted as lost"
        lines.append(f"  ({ledger.since_s:,.1f} s after the newest record: {kind})")
    return lines
