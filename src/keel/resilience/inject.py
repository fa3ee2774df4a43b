"""Fault injection for tests and soaks: `resilience.inject` names faults that fire from inside the run, once.

  kill:rank=R:step=S[:times=N]      the rank SIGKILLs itself as step S begins (N times in all: a crash loop)
  nan:step=S[:rank=R]               the rank's forward pass of step S returns NaN (non-finite loss and gradients)
  spike:step=S[:rank=R]             the rank's logits of step S are scaled up 100x (a finite loss spike; under
                                    pipeline parallel, the outputs of the rank's stages)
  hang:rank=R:step=S                the rank's loop stops dead as step S begins (its watchdog thread lives on)
  sigterm:step=S                    after step S, SIGTERM to the launcher (or to this process without one)
  corrupt_checkpoint:step=S         once the checkpoint of step S is committed, bytes of one of its files flip
  slow:rank=R[:step=S][:ms=M]       from step S (default 1) on, the rank waits M ms (default 200) more for data

Each fault fires once per run (a kill `times` times): it is recorded in events.jsonl before it fires, and a
restarted or resumed run reads which have fired.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from keel.callback import Callback, StepOutcome
from keel.checkpoint.checkpointer import Checkpointer
from keel.io import read_jsonl
from keel.observe.events import EventLog
from keel.observe.step_timer import StepTimer

KINDS: dict[str, tuple[set[str], set[str]]] = {  # kind: (required keys, optional keys)
    "kill": ({"rank", "step"}, {"times"}),
    "nan": ({"step"}, {"rank"}),
    "spike": ({"step"}, {"rank"}),
    "hang": ({"rank", "step"}, set()),
    "sigterm": ({"step"}, set()),
    "corrupt_checkpoint": ({"step"}, set()),
    "slow": ({"rank"}, {"step", "ms"}),
}


@dataclass(frozen=True)
class Fault:
    """One fault of the spec: its position in it (its identity), kind and integer settings."""

    index: int
    kind: str
    rank: int = 0
    step: int = 1
    ms: int = 200
    times: int = 1


def parse_faults(spec: str, world_size: int) -> list[Fault]:
    """Parse a `resilience.inject` spec; a mistake is a ValueError naming the fault and what is wrong."""
    faults = []
    for index, text in enumerate(part.strip() for part in spec.split(",") if part.strip()):
        kind, *pairs = text.split(":")
        if kind not in KINDS:
            raise ValueError(f"{text!r}: unknown fault {kind!r} (known: {', '.join(KINDS)})")
        required, optional = KINDS[kind]
        settings: dict[str, int] = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in required | optional:
                raise ValueError(f"{text!r}: {kind} takes {', '.join(sorted(required | optional))}, not {key!r}")
            if not value.isdigit():
                raise ValueError(f"{text!r}: {key} must be a non-negative integer, e.g. {key}=3")
            settings[key] = int(value)
        missing = required - set(settings)
        if missing:
            raise ValueError(f"{text!r}: {kind} needs {', '.join(sorted(missing))}")
        fault = Fault(index, kind, **settings)
        if fault.rank >= world_size:
            raise ValueError(f"{text!r}: rank {fault.rank} does not exist in a run of {world_size} processes")
        if fault.step < 1:
            raise ValueError(f"{text!r}: steps count from 1")
        faults.append(fault)
    return faults


class FaultInjector(Callback):
    """Fires the configured faults at their steps on their ranks (see the module doc)."""

    def __init__(
        self,
        faults: list[Fault],
        rank: int,
        modules: list[nn.Module],
        events: EventLog,
        checkpointer: Checkpointer,
        timer: StepTimer,
    ):
        fired = Counter(e.get("fault") for e in read_jsonl(events.path) if e.get("event") == "inject")
        self.faults = [f for f in faults if fired[f.index] < f.times or f.kind == "slow"]
        self.rank, self.modules, self.events, self.checkpointer, self.timer = rank, modules, events, checkpointer, timer
        self._hooks: list[Any] = []

    def _mine(self, kind: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.step == step and f.rank == self.rank]

    def _fire(self, fault: Fault, **fields: Any) -> None:
        self.events.incident("inject", fault=fault.index, kind=fault.kind, rank=self.rank, step=fault.step, **fields)
        self.faults.remove(fault)

    def before_step(self, step: int) -> None:
        for fault in self.faults:
            if fault.kind == "slow" and fault.rank == self.rank and step >= fault.step:
                with self.timer.phase("data_wait"):  # a slow input pipeline, as the straggler watch sees one
                    time.sleep(fault.ms / 1000)
        for kind, scale in (("nan", float("nan")), ("spike", 100.0)):
            for fault in self._mine(kind, step):
                self._fire(fault)
                self._hooks += [m.register_forward_hook(lambda _m, _a, out, s=scale: out * s) for m in self.modules]
        for fault in self._mine("kill", step):
            self._fire(fault)
            os.kill(os.getpid(), signal.SIGKILL)
        for fault in self._mine("hang", step):
            self._fire(fault)
            threading.Event().wait()  # the main thread never returns; only the watchdog can end this rank

    def after_step(self, outcome: StepOutcome) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for fault in self._mine("sigterm", outcome.step):
            launcher = int(os.environ.get("KEEL_LAUNCHER_PID", os.getpid()))
            self._fire(fault, pid=launcher)
            os.kill(launcher, signal.SIGTERM)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for fault in self._mine("corrupt_checkpoint", step):
            self.checkpointer.wait()  # corrupt it once committed, as a disk would
            target = max((p for p in Path(path).rglob("*.distcp")), key=lambda p: p.stat().st_size)
            with open(target, "r+b") as f:
                f.seek(target.stat().st_size // 2)
                chunk = f.read(64)
                f.seek(-len(chunk), os.SEEK_CUR)
                f.write(bytes(b ^ 0xFF for b in chunk))
            self._fire(fault, file=str(target))
