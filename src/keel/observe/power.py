"""Where a rank's energy figures come from: NVML on a GPU, RAPL on a CPU, else the device's rated power (an estimate).

Each source answers one question, the joules used since it was last asked; the energy meter
(keel.observe.energy) asks. Accuracy, best first (docs/cards.md):

  NVML energy counter   the GPU board's own counter (Volta and later), in mJ
  NVML power            the board's power reading (averaged by the driver over about a second), integrated
  RAPL                  the CPU packages' and DRAM's energy counters (Linux powercap), read by one rank per host:
                        they count every process on the packages, the run's and any other's
  rated                 a constant: the data-sheet TDP or board power, which a busy device draws at most about;
                        always labelled an estimate
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keel.distributed.env import DistEnv
from keel.observe.mfu import identify

POWERCAP = Path("/sys/class/powercap")
# Data-sheet TDP (W) and hardware threads of CPUs, by a fragment of /proc/cpuinfo's model name.
CPU_TDP: dict[str, tuple[float, int]] = {
    "EPYC 9654": (360.0, 192),
    "EPYC 9554": (360.0, 128),
    "EPYC 7763": (280.0, 128),
    "EPYC 7742": (225.0, 128),
    "Platinum 8480": (350.0, 112),
    "Platinum 8380": (270.0, 80),
    "Gold 6248": (150.0, 40),
}
# A CPU not in the table: about the middle of its TDPs per hardware thread (1.9 to 3.8 W).
WATTS_PER_THREAD = 3.0
# Data-sheet board power (W) by the product variant keel.observe.mfu.identify names, or a fragment of the name.
GPU_WATTS: dict[str, float] = {
    "H100 SXM": 700.0,
    "H100 PCIe": 350.0,
    "H100 NVL": 400.0,
    "H200 SXM": 700.0,
    "H200 NVL": 600.0,
    "A100 SXM": 400.0,
    "A100 PCIe 40GB": 250.0,
    "A100 PCIe 80GB": 300.0,
    "L40S": 350.0,
    "RTX 4090": 450.0,
    "L4": 72.0,
    "T4": 70.0,
}
GPU_DEFAULT_WATTS = 400.0  # a GPU not in the table: an A100 SXM's, the middle of data-centre boards


@dataclass
class Source:
    """A constant power (the rated path); subclasses measure. `joules(seconds)` is the energy since the last call."""

    device: str
    method: str
    watts: float = 0.0
    estimate: bool = True

    def start(self) -> None:
        """Begin counting from now."""

    def joules(self, seconds: float) -> float:
        """Energy used since `start` or the previous call, `seconds` ago."""
        return self.watts * seconds


@dataclass
class Rapl(Source):
    """The energy counters of CPU packages (and their DRAM) under Linux powercap; they wrap at max_energy_range_uj."""

    zones: list[Path] = field(default_factory=list)
    estimate: bool = False
    _last: dict[Path, int] = field(default_factory=dict)

    def start(self) -> None:
        self._last = {zone: _read_int(zone / "energy_uj") for zone in self.zones}

    def joules(self, seconds: float) -> float:
        total = 0
        for zone, before in self._last.items():
            now = _read_int(zone / "energy_uj")
            total += now - before if now >= before else now + _read_int(zone / "max_energy_range_uj") + 1 - before
            self._last[zone] = now
        return total / 1e6


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def rapl_zones(root: Path = POWERCAP) -> list[Path]:
    """The readable RAPL zones to count: each package, and a DRAM zone under it (psys would count them twice)."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        try:
            name = (zone / "name").read_text().strip()
            _read_int(zone / "energy_uj")
            _read_int(zone / "max_energy_range_uj")
        except (OSError, ValueError):  # unreadable (not root since 2020's RAPL side channel fix) or malformed
            continue
        top = re.fullmatch(r"intel-rapl:\d+", zone.name) is not None
        if (top and name.startswith("package")) or (not top and name == "dram"):
            zones.append(zone)
    return zones


@dataclass
class Nvml(Source):
    """A GPU board's NVML energy counter (mJ), or, where the board has none, its power reading integrated."""

    nvml: Any = None  # the pynvml module
    handle: Any = None
    estimate: bool = False
    _last: float = 0.0  # the counter (mJ), or the previous power reading (W)
    _counter: bool = True

    def start(self) -> None:
        try:
            self._last = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
            self.method = "NVML energy counter"
        except self.nvml.NVMLError:
            self._counter, self.method = False, "NVML power readings, integrated"
            self._last = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000

    def joules(self, seconds: float) -> float:
        if self._counter:
            now = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
            used, self._last = (now - self._last) / 1000, now
            return used
        watts = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
        used, self._last = trapezoid(self._last, watts, seconds), watts
        return used


def trapezoid(before_w: float, after_w: float, seconds: float) -> float:
    """Joules between two power readings `seconds` apart, power taken to change linearly between them."""
    return (before_w + after_w) / 2 * seconds


def open_nvml(index: int, name: str) -> Nvml | None:
    """NVML for CUDA device `index` (found by UUID, so CUDA_VISIBLE_DEVICES does not matter), or None without it."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        source = Nvml(name, "NVML", nvml=pynvml, handle=handle)
        source.start()
    except pynvml.NVMLError:  # no driver library, a device NVML does not show, no power reading
        return None
    return source


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rated_cpu(model: str, threads: int) -> Source:
    """The estimate for `threads` busy hardware threads of a `model` CPU: its TDP's share, or WATTS_PER_THREAD."""
    for fragment, (tdp, total) in CPU_TDP.items():
        if fragment in model:
            watts = tdp / total * threads
            return Source(model, f"estimate: data-sheet TDP {tdp:g} W / {total} threads x {threads} threads", watts)
    how = f"estimate: {WATTS_PER_THREAD:g} W per thread x {threads} threads (CPU model not in Keel's table)"
    return Source(model, how, WATTS_PER_THREAD * threads)


def rated_gpu(name: str, sms: int, memory_bytes: int) -> Source:
    """The estimate for a GPU: its data-sheet board power, or GPU_DEFAULT_WATTS for one not in the table."""
    acc = identify(name, sms, memory_bytes)
    label = acc.name if acc is not None else name
    for fragment, watts in GPU_WATTS.items():
        if fragment in label:
            return Source(name, f"estimate: data-sheet board power of the {fragment}, {watts:g} W", watts)
    return Source(name, f"estimate: {GPU_DEFAULT_WATTS:g} W (GPU not in Keel's table)", GPU_DEFAULT_WATTS)


def power_source(env: DistEnv) -> Source:
    """The best source this rank has: NVML or a GPU's rating; RAPL (local rank 0 only) or a CPU's rating."""
    if env.device.type == "cuda":
        props = torch.cuda.get_device_properties(env.device)
        nvml = open_nvml(env.device.index or 0, props.name)
        return nvml or rated_gpu(props.name, props.multi_processor_count, props.total_memory)
    zones = rapl_zones()
    if zones and env.local_rank == 0:
        return Rapl(cpu_model(), f"RAPL counters ({', '.join(z.name for z in zones)})", zones=zones)
    if zones:  # the packages' counters already hold this rank's use: local rank 0 counts them once for the host
        return Source(cpu_model(), "RAPL, counted by local rank 0", 0.0, estimate=False)
    return rated_cpu(cpu_model(), torch.get_num_threads())
