"""How far a pass of `keel data prepare` over its sources got, said every so often: input, rate, time left."""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import accumulate

from keel.units import duration

EVERY_S = 30.0  # a long pass says how far it got this often


class PassProgress:
    """A pass's progress through the input files, in bytes of the files (a span's end, or a whole file once done).

    `unit` names what is counted in millions (MB of input by default; a pass over other things, e.g. dedup's keys
    or documents, names its own)."""

    def __init__(self, name: str, sizes: list[int], log: Callable[[str], None], first_file: int = 0, unit: str = "MB"):
        self.name, self.sizes, self.log, self.unit = name, sizes, log, unit
        self.before = [0, *accumulate(sizes)]  # input bytes of the files before each file
        self.total = self.before[-1]
        self.started, self.last = time.perf_counter(), time.perf_counter()
        self.start_bytes = self.before[first_file]  # a resumed pass starts where the files before were done

    def update(self, file: int, through: int, counts: Callable[[], str]) -> None:
        """Note that the pass reached byte `through` of file `file`; log a line if it is time (counts: its tail)."""
        now = time.perf_counter()
        if now - self.last < EVERY_S:
            return
        self.last = now
        done = self.before[file] + min(through, self.sizes[file])
        rate = (done - self.start_bytes) / max(now - self.started, 1e-9)
        left = f"about {duration((self.total - done) / rate)} left" if rate > 0 else "time left not known yet"
        share = 100 * done / max(self.total, 1)
        self.log(
            f"{self.name}: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} {self.unit} ({share:.0f}%), "
            f"{rate / 1e6:.1f} {self.unit}/s, {counts()}; {left}"
        )
