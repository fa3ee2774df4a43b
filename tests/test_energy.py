"""Power sources: RAPL counters (a real powercap layout), NVML on a real GPU, rated power, the meter, arithmetic."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from keel.callback import StepOutcome
from keel.distributed.env import DistEnv
from keel.io import read_jsonl
from keel.observe.energy import EnergyMeter, co2e_kg, cost
from keel.observe.events import EventLog
from keel.observe.power import (
    GPU_DEFAULT_WATTS,
    WATTS_PER_THREAD,
    Nvml,
    Rapl,
    Source,
    cpu_model,
    open_nvml,
    power_source,
    rapl_zones,
    rated_cpu,
    rated_gpu,
    trapezoid,
)
from keel.rundir import RunDir


def zone(root: Path, name: str, label: str, energy_uj: object, max_uj: int = 1_000_000) -> Path:
    """A powercap zone directory as the kernel lays it out (name, energy_uj, max_energy_range_uj)."""
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(f"{label}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def test_rapl_counts_each_package_and_its_dram_once_across_a_counter_wrap(tmp_path):
    package = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, max_uj=10_000_000)
    zone(tmp_path, "intel-rapl:0/intel-rapl:0:0", "core", 5)  # inside the package's count: not added again
    dram = zone(tmp_path, "intel-rapl:0/intel-rapl:0:1", "dram", 999_500)
    zone(tmp_path, "intel-rapl:1", "psys", 7)  # the whole platform: would count the package twice
    zone(tmp_path, "intel-rapl:2", "package-1", "unreadable")  # a malformed counter is skipped, not fatal
    # The kernel nests subzones inside their package's directory and links every zone at the top.
    for sub in ("intel-rapl:0:0", "intel-rapl:0:1"):
        (tmp_path / sub).symlink_to(tmp_path / "intel-rapl:0" / sub)
    zones = rapl_zones(tmp_path)
    assert [z.name for z in zones] == ["intel-rapl:0", "intel-rapl:0:1"]
    source = Rapl("cpu", "RAPL", zones=zones)
    source.start()
    (package / "energy_uj").write_text("3000000\n")  # +2 J
    (dram / "energy_uj").write_text("200\n")  # wrapped at 1,000,000: +500 + 1 + 200 uJ
    assert source.joules(1.0) == pytest.approx(2.0 + 701e-6)
    assert source.joules(1.0) == 0.0  # nothing used since


def test_real_rapl_counters_read_where_the_machine_has_them():
    zones = rapl_zones()
    if not zones:
        pytest.skip("no readable RAPL counters under /sys/class/powercap on this machine")
    source = Rapl(cpu_model(), "RAPL", zones=zones)
    source.start()
    sum(range(10**6))
    assert source.joules(0.1) >= 0.0


def test_nvml_integrates_power_readings_between_reads():
    assert trapezoid(200.0, 300.0, 2.0) == pytest.approx(500.0)  # (200 W + 300 W) / 2 x 2 s
    assert trapezoid(350.0, 350.0, 0.5) == pytest.approx(175.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and its driver's NVML")
def test_real_nvml_measures_a_gpu():
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    source = power_source(env)
    assert isinstance(source, Nvml) and not source.estimate and source.method.startswith("NVML")
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    source.start()  # count from here: CUDA's start-up above is not in the window
    started = time.perf_counter()
    for _ in range(400):  # about a second of fp32 matmuls on a data-centre GPU
        x = x @ x / 64
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    joules = source.joules(seconds)
    assert 10.0 * seconds < joules < 2000.0 * seconds  # a busy board draws tens to hundreds of watts


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where there is no NVIDIA driver")
def test_without_an_nvidia_driver_nvml_is_not_used():
    assert open_nvml(0, "any") is None  # pynvml's library-not-found is a fallback, not an error
    source = power_source(DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert isinstance(source, Rapl) if rapl_zones() else source.estimate and "estimate" in source.method


def test_rated_power_comes_from_the_data_sheet_tables_or_a_labelled_default():
    epyc = rated_cpu("AMD EPYC 7763 64-Core Processor", threads=4)
    assert epyc.watts == pytest.approx(280 / 128 * 4) and epyc.estimate and "TDP 280 W" in epyc.method
    unknown = rated_cpu("AMD EPYC", threads=2)
    assert unknown.watts == WATTS_PER_THREAD * 2 and "not in Keel's table" in unknown.method
    assert rated_gpu("NVIDIA H100 80GB HBM3", 132, 80 * 2**30).watts == 700
    assert rated_gpu("NVIDIA H100 PCIe", 114, 80 * 2**30).watts == 350
    assert rated_gpu("NVIDIA A100-SXM4-80GB", 108, 80 * 2**30).watts == 400
    other = rated_gpu("Some Future GPU", 10, 2**30)
    assert other.watts == GPU_DEFAULT_WATTS and other.estimate


def test_emissions_and_cost_arithmetic():
    assert co2e_kg(2.5, 400.0) == pytest.approx(1.0)  # 2.5 kWh x 400 g/kWh = 1 kg
    assert co2e_kg(0.0, 480.0) == 0.0
    assert cost(12.0, 2.5) == pytest.approx(30.0)


def meter(tmp_path: Path, watts: float = 100.0) -> EnergyMeter:
    """A single-process meter over a constant source, writing its events into a fresh run dir."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    events = EventLog(tmp_path / "events.jsonl")
    return EnergyMeter(Source("cpu", "estimate: test", watts), env, events, RunDir(tmp_path), every=1, total_steps=9)


def step(m: EnergyMeter, n: int) -> dict[str, float]:
    outcome = StepOutcome(n, loss=None, grad_norm=0.0, updated=True, step_time_s=0.0, data_wait_s=0.0, last=False)
    m.after_step(outcome)
    return outcome.values


def test_meter_resumes_a_checkpoints_totals_and_a_rollback_gives_no_energy_back(tmp_path):
    first = meter(tmp_path)
    first.on_train_start(0)
    time.sleep(0.05)
    step(first, 1)
    saved = first.state_dict()
    assert saved["energy_kwh"] > 0 and saved["energy_kwh"] == saved["energy_estimated_kwh"]
    time.sleep(0.05)
    before = step(first, 2)["energy_kwh"]
    first.load_state_dict(saved)  # a rollback to the checkpoint of step 1, inside the loop
    assert first.state_dict()["energy_kwh"] == before  # what the next checkpoint holds: nothing given back
    assert step(first, 2)["energy_kwh"] > before  # still counting up from where it was
    (tmp_path / "resumed").mkdir()
    resumed = meter(tmp_path / "resumed")
    resumed.load_state_dict(saved)  # a resume: before the loop starts
    resumed.on_train_start(1)
    assert step(resumed, 2)["energy_kwh"] > saved["energy_kwh"]
    resumed.on_exit("finished")
    final = [e for e in read_jsonl(tmp_path / "resumed" / "events.jsonl") if e["event"] == "energy"][-1]
    assert final["final"] == "finished" and final["energy_kwh"] > saved["energy_kwh"]
    # A later attempt without the checkpoint still starts from the largest total the run dir records.
    again = meter(tmp_path / "resumed")
    again.on_train_start(2)
    assert again.totals["energy_kwh"] == final["energy_kwh"]


class SteppedCounter(Source):
    """An energy counter like NVML's: it advances by a whole quantum (10 ms of 700 W) at a time."""

    def start(self) -> None:
        self._origin, self._read = time.perf_counter(), 0

    def joules(self, seconds: float) -> float:
        quanta = int((time.perf_counter() - self._origin) / 0.01)
        new, self._read = quanta - self._read, quanta
        return new * 7.0


def test_power_is_averaged_over_a_window_long_enough_for_a_stepped_counter(tmp_path):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    source = SteppedCounter("gpu", "a stepped counter", watts=700.0, estimate=False)
    m = EnergyMeter(source, env, EventLog(tmp_path / "events.jsonl"), RunDir(tmp_path), every=1, total_steps=400)
    m.on_train_start(0)
    powers = []
    for n in range(1, 300):  # steps of ~6 ms: each alone sees 0 or 1 quantum of the counter (0 or ~1,200 W)
        time.sleep(0.006)
        powers.append(step(m, n)["power_w"])
    late = sorted(powers[200:])  # once the window is full
    assert late[0] > 600 and late[-1] < 800 and 650 < late[len(late) // 2] < 750
