"""Preemption: a signal stops every rank at the same step boundary, after a checkpoint of that step is committed.

A signal handler only sets a flag; the ranks agree on it with one small all-reduce after every step, so they
all stop at the same step even when the signal reached only one of them. Ctrl-C (SIGINT) stops the same way,
as "stopped"; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from keel.callback import Callback, LoopControl, StepOutcome
from keel.distributed.env import DistEnv, collective_device
from keel.observe.step_timer import StepTimer

_received: list[int] = []  # signals received by this process, oldest first
PREEMPTED = 1000  # agreement codes at or above this are a preemption signal's number plus this


def _on_signal(signum: int, frame: object) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
    _received.append(signum)


def install_handlers(names: list[str]) -> None:
    """Catch the preemption signals (and SIGINT) so that they set the flag instead of ending the process."""
    for name in {*names, "SIGINT"}:
        signal.signal(getattr(signal, name), _on_signal)


def received() -> list[int]:
    """The signals this process has caught so far."""
    return list(_received)


class Preemption(Callback):
    """After every step, the ranks agree whether any of them caught a signal; if so, the run stops there."""

    def __init__(self, env: DistEnv, control: LoopControl, timer: StepTimer):
        self.env, self.control, self.timer = env, control, timer

    def after_step(self, outcome: StepOutcome) -> None:
        self.timer.mark("collective")
        # Per rank: 0 nothing caught, 1 Ctrl-C, PREEMPTED + the signal number; the largest wins on every rank.
        preempting = [s for s in _received if s != signal.SIGINT]
        code = PREEMPTED + preempting[0] if preempting else int(bool(_received))
        if self.env.distributed:
            flag = torch.tensor([code], dtype=torch.int64, device=collective_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code >= PREEMPTED:
            self.control.request_stop(f"preempted ({signal.Signals(code - PREEMPTED).name})", exit_state="preempted")
        elif code == 1:
            self.control.request_stop("interrupted (Ctrl-C)", exit_state="stopped")
