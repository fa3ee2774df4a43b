"""The energy meter: each rank's energy and device time, summed over ranks and attempts, as metrics and events.

Each rank reads its power source (keel.observe.power) after a logged step, and otherwise at most every
SAMPLE_S seconds (a counter read costs microseconds; reading often keeps RAPL's wrap-around and the power
integral honest). On logged steps the ranks gather their figures and the step records the run's totals:

  energy_kwh            every rank's energy since the run began, all attempts
  energy_estimated_kwh  the part of it that is an estimate from rated power, not a measurement
  device_hours          every rank's time in the training loop, all attempts
  power_w               the ranks' mean power over the last POWER_WINDOW_S seconds at least, summed

Only the loop is metered: the start-up of each attempt (its share of wall time is the goodput ledger's
`startup`) is not. Totals are in every checkpoint, and an attempt starts from the largest total the run has
recorded anywhere (checkpoint, metrics.jsonl, metrics.rolled_back.jsonl, `energy` events): energy is never
given back, so work a restart or rollback threw away still counts. When the loop ends an `energy` event
holds the final totals; each rank's source is in a `power_source` event, after its first step.
"""

from __future__ import annotations

import socket
import time
from collections import deque

from keel.callback import Callback, StepOutcome
from keel.distributed.env import DistEnv, all_gather_floats
from keel.io import read_jsonl
from keel.observe.events import EventLog
from keel.observe.power import Source
from keel.rundir import RunDir

SAMPLE_S = 1.0  # the longest a rank goes without reading its source
# An energy counter advances in steps (NVML's every few tens of ms): over one short step its difference is often
# 0 or two steps' worth, and a median of such windows read 806 W on a 700 W H200. Power is averaged over the reads
# that span at least this long.
POWER_WINDOW_S = 2.0
TOTALS = ("energy_kwh", "energy_estimated_kwh", "device_hours")
JOULES_PER_KWH = 3.6e6


def recorded_totals(run: RunDir) -> dict[str, float]:
    """The largest totals the run dir records (metrics of every attempt, `energy` events); zeros if none."""
    records = read_jsonl(run.metrics) + read_jsonl(run.metrics_rolled_back)
    records += [e for e in read_jsonl(run.events) if e.get("event") == "energy"]
    return {name: max([float(r[name]) for r in records if name in r], default=0.0) for name in TOTALS}


def co2e_kg(kwh: float, grid_gco2_per_kwh: float) -> float:
    """Emissions of `kwh` at a grid's carbon intensity, in kg CO2e."""
    return kwh * grid_gco2_per_kwh / 1000


def cost(device_hours: float, price_per_device_hour: float) -> float:
    """What `device_hours` cost at a price per device-hour."""
    return device_hours * price_per_device_hour


class EnergyMeter(Callback):
    """Integrates this rank's energy from its power source; records the run's totals on logged steps."""

    def __init__(self, source: Source, env: DistEnv, events: EventLog, run: RunDir, every: int, total_steps: int):
        self.source, self.env, self.events, self.run = source, env, events, run
        self.every, self.total_steps = every, total_steps
        self.totals = dict.fromkeys(TOTALS, 0.0)  # the run's, as of the last gather (the same on every rank)
        self._carried = dict(self.totals)  # the run's before this attempt
        self._mine = [0.0, 0.0, 0.0]  # this rank this attempt: joules, estimated joules, seconds
        self._recent: deque[tuple[float, float]] = deque()  # (joules, seconds) of the reads in the power window
        self._window = [0.0, 0.0]  # their sums
        self._last: float | None = None  # when the source was last read; None before the loop starts
        self._step = 0
        self._announced = False  # whether this attempt's `power_source` event is written

    def on_train_start(self, step: int) -> None:
        recorded = recorded_totals(self.run) if self.env.is_main else dict.fromkeys(TOTALS, 0.0)
        main = all_gather_floats([recorded[name] for name in TOTALS])[0]  # rank 0 reads, every rank agrees
        self.totals = {name: max(self.totals[name], value) for name, value in zip(TOTALS, main, strict=True)}
        self._carried, self._step = dict(self.totals), step
        self.source.start()
        self._last = time.perf_counter()

    def after_step(self, outcome: StepOutcome) -> None:
        if not self._announced:
            self._announce()
        self._step = outcome.step
        due = outcome.step % self.every == 0 or outcome.step == self.total_steps
        if due or time.perf_counter() - self._last >= SAMPLE_S:
            self._read()
        if due and not outcome.discarded:  # every rank agrees on both, so every rank gathers
            outcome.values.update(self._gather())

    def on_exit(self, state: str) -> None:
        self._read()
        values = self._gather()
        self.events("energy", step=self._step, **values, final=state)

    def _announce(self) -> None:
        # After the first step, not at the start: every rank's `power_source` then follows the attempt's `start`
        # event (rank 0 writes it last of all the callbacks, and the step's collectives wait for rank 0).
        s, self._announced = self.source, True
        watts = s.watts if s.estimate else None
        self.events.incident(
            "power_source",
            rank=self.env.rank,
            host=socket.gethostname(),
            device=s.device,
            method=s.method,
            estimate=s.estimate,
            watts=watts,
        )

    def state_dict(self) -> dict[str, float]:
        """The run's totals as of the last logged step."""
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue a checkpoint's totals on resume; a rollback inside the loop keeps them: energy is not given back."""
        if self._last is None:
            self.totals = {name: float(state[name]) for name in TOTALS}

    def _read(self) -> None:
        now = time.perf_counter()
        seconds = now - self._last
        joules = self.source.joules(seconds)
        self._mine[0] += joules
        self._mine[1] += joules if self.source.estimate else 0.0
        self._mine[2] += seconds
        self._recent.append((joules, seconds))
        self._window[0] += joules
        self._window[1] += seconds
        while len(self._recent) > 1 and self._window[1] - self._recent[0][1] >= POWER_WINDOW_S:
            old_joules, old_seconds = self._recent.popleft()
            self._window[0] -= old_joules
            self._window[1] -= old_seconds
        self._last = now

    def _gather(self) -> dict[str, float]:
        rows = all_gather_floats([*self._mine, *self._window])
        used = [sum(row[i] for row in rows) for i in range(3)]
        self.totals = {
            "energy_kwh": self._carried["energy_kwh"] + used[0] / JOULES_PER_KWH,
            "energy_estimated_kwh": self._carried["energy_estimated_kwh"] + used[1] / JOULES_PER_KWH,
            "device_hours": self._carried["device_hours"] + used[2] / 3600,
        }
        power = sum(row[3] / row[4] for row in rows if row[4] > 0)
        return {**self.totals, "power_w": power}
