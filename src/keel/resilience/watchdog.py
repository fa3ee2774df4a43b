"""The hang watchdog: a thread per rank that notices a phase running too long, says where, and ends the rank.

Each rank also keeps a small memory-mapped progress file (pid, host, step, phase, since, alive): the launcher
reads it to name the step a killed rank died at, and a firing watchdog reads its neighbours' to tell a rank
that is frozen (stopped, its watchdog silent too) from ranks that are only waiting for it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import mmap
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from keel.callback import Callback, StepOutcome
from keel.distributed.env import DistEnv
from keel.observe.events import EventLog
from keel.observe.heartbeat import mark_state
from keel.observe.step_timer import StepTimer
from keel.rundir import RunDir

log = logging.getLogger("keel")

LAYOUT = struct.Struct("<qq dd 32s 32s")  # pid, step, phase since, alive at, host, phase
EXIT_HANG = 124  # as timeout(1): the rank ended itself because a phase ran past resilience.hang_timeout_s


class RankProgress:
    """This rank's progress file; the main thread writes the step, the watchdog the phase and its liveness."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * LAYOUT.size)
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), LAYOUT.size)
        self.pid, self.host, self.step = os.getpid(), socket.gethostname(), 0
        self.write("starting", time.time())

    def write(self, phase: str, since: float) -> None:
        """Store the current state (a memory write; the kernel writes the page back when it likes)."""
        record = (self.pid, self.step, since, time.time(), self.host.encode()[:32], phase.encode()[:32])
        self._map[:] = LAYOUT.pack(*record)

    def close(self) -> None:
        """Unmap the file (it stays, with the last state, for whoever reads it after this rank is gone)."""
        self._map.close()
        self._file.close()


def read_progress(path: Path) -> dict[str, Any] | None:
    """A rank's last progress record, or None if there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) != LAYOUT.size:
        return None
    pid, step, since, alive, host, phase = LAYOUT.unpack(data)
    if not pid:
        return None
    text = {"host": host.rstrip(b"\0").decode(errors="replace"), "phase": phase.rstrip(b"\0").decode(errors="replace")}
    return {"pid": pid, "step": step, "since": since, "alive_at": alive, **text}


class HangWatchdog(Callback):
    """Fires when one phase of the loop runs longer than `timeout_s`: dumps every thread's stack to the rank
    log, records a `hang` event (rank, step, phase, frozen neighbours), kills frozen local ranks, and exits."""

    def __init__(self, timeout_s: float, env: DistEnv, events: EventLog, run: RunDir, timer: StepTimer):
        self.timeout_s, self.env, self.events, self.run, self.timer = timeout_s, env, events, run, timer
        self.progress = RankProgress(run.rank_progress(env.rank))
        self.tick = min(1.0, timeout_s / 8) if timeout_s else 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="keel-watchdog", daemon=True)

    def on_train_start(self, step: int) -> None:
        self.progress.step = step
        self._thread.start()

    def before_step(self, step: int) -> None:
        self.progress.step = step
        self.timer.mark("step start")
        self.progress.write(self.timer.current, self.timer.since)  # exact, for a rank killed before the next tick

    def after_step(self, outcome: StepOutcome) -> None:
        # The watchdog's hook runs first: the callbacks after it exchange the step's values (loss, energy,
        # timings, the stop flag), so a rank stuck here waits for a peer; validation and saves mark their own.
        self.timer.mark("collective")

    def on_exit(self, state: str) -> None:
        self._stop.set()

    def on_error(self, error: BaseException) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            phase, since = self.timer.current, self.timer.since
            self.progress.write(phase, since)
            if self.timeout_s and time.time() - since > self.timeout_s and not self._stop.is_set():
                self._fire(phase, since)

    def _fire(self, phase: str, since: float) -> None:
        step, stuck = self.progress.step, time.time() - since
        with open(self.run.rank_log(self.env.rank), "a") as f:
            f.write(f"\nkeel: hang: step {step} has been in {phase} for {stuck:.0f} s; every thread's stack:\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        frozen = self._frozen_neighbours()
        self.events.incident(
            "hang",
            rank=self.env.rank,
            step=step,
            phase=phase,
            stuck_s=round(stuck, 1),
            frozen_ranks=sorted(frozen),
            log=str(self.run.rank_log(self.env.rank)),
        )
        log.error(
            f"hang: rank {self.env.rank} stuck in {phase} at step {step} for {stuck:.0f} s"
            + (f"; ranks {sorted(frozen)} are frozen" if frozen else "")
            + "; stacks in the rank log; ending this rank so the run restarts"
        )
        if self.env.is_main:  # the heartbeat would otherwise say "running" until it looks stalled
            mark_state(self.run.root, "crashed", error=f"hang at step {step} in {phase} (rank {self.env.rank})")
        for pid in frozen.values():
            # A stopped process ignores the launcher's SIGTERM: the restart would wait out its grace period.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        logging.shutdown()
        os._exit(EXIT_HANG)

    def _frozen_neighbours(self) -> dict[int, int]:
        """Ranks on this host whose watchdog has not written for a while (stopped or frozen): rank -> pid."""
        # Silent for three ticks: a watchdog thread that runs would have written (a hang is only declared after
        # eight ticks, so a rank frozen since the hang began is found).
        frozen, host, limit = {}, socket.gethostname(), 3 * self.tick
        for rank in range(self.env.world_size):
            record = read_progress(self.run.rank_progress(rank))
            if rank == self.env.rank or not record or record["host"] != host:
                continue
            if time.time() - record["alive_at"] > limit and _exists(record["pid"]):
                frozen[rank] = record["pid"]
        return frozen


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
