"""Process lifetimes: a child that dies with its parent, and a stop signal that unwinds like Ctrl-C."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (elsewhere a no-op).

    A worker process would otherwise outlive a launcher or a pool owner killed by SIGKILL (an OOM kill, a
    scheduler), holding CPUs, GPUs, ports and the pipes its parent's parent waits on.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


class Stopped(BaseException):
    """A stop signal arrived: unwinds like KeyboardInterrupt (cleanup runs), and the command exits 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on(*signums: int) -> Iterator[None]:
    """Within the block, these signals raise Stopped in the main thread instead of ending the process at once."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
