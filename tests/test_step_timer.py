"""The step-time breakdown: data wait, forward, backward, optimizer, eval and checkpoint add up to the step."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from conftest import read_metrics, run_keel, tiny_config
from keel.observe.step_timer import MAX_PENDING, PHASES, StepTimer


def test_phases_of_a_real_run_add_up_to_its_step_time(tmp_path, dataset):
    config = tiny_config(
        tmp_path / "c.toml",
        dataset,
        train={"steps": 30, "eval_every": 10, "global_batch_size": 16},
        checkpoint={"every": 10},
        observe={"log_every": 5},
    )
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    records = [r for r in read_metrics(tmp_path / "runs" / "tiny") if "step_time_s" in r]
    assert len(records) == 6
    shares = [sum(r[f"{p}_s"] for p in PHASES) / r["step_time_s"] for r in records]
    if torch.cuda.is_available():  # GPU time: the GPU waits for a tiny model's host work (0.89 on an H200)
        assert 0.5 < statistics.median(shares) < 1.05, shares
    else:
        assert statistics.median(shares) == pytest.approx(1.0, abs=0.05), shares
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0 for r in records)
    assert any(r["checkpoint_s"] > 0 for r in records) and any(r["eval_s"] > 0 for r in records)


def test_timer_reports_mean_seconds_per_step_and_resets():
    timer = StepTimer(torch.device("cpu"))
    with timer.phase("forward"):
        torch.ones(256, 256) @ torch.ones(256, 256)
    first = timer.take(steps=2)
    assert first["forward_s"] > 0 and first["backward_s"] == 0
    assert timer.take(steps=1)["forward_s"] == 0
    with pytest.raises(ValueError, match="unknown step phase"):
        with timer.phase("lunch"):
            pass


class HostEvent:
    """torch.cuda.Event's interface on the host clock (no GPU here), logging every wait and read into `log`."""

    def __init__(self, log: list[str]):
        self.log, self.at = log, None

    def record(self) -> None:
        self.at = time.perf_counter()

    def query(self) -> bool:
        return self.at is not None

    def synchronize(self) -> None:
        self.log.append("synchronize")

    def elapsed_time(self, end: HostEvent) -> float:
        self.log.append("read")
        return (end.at - self.at) * 1000  # milliseconds, as CUDA's


def test_gpu_phases_are_read_from_events_only_when_taken_and_with_one_wait():
    log: list[str] = []
    timer = StepTimer(torch.device("cpu"), event=lambda: HostEvent(log))
    for _ in range(3):
        with timer.phase("data_wait"):
            time.sleep(0.01)
        for phase in ("forward", "backward", "optimizer"):
            with timer.phase(phase):
                time.sleep(0.01)
    assert log == [] and timer.totals["forward"] == 0  # nothing read, nothing waited for, between logged steps
    assert timer.totals["data_wait"] >= 0.03  # host phases are wall time at once (the goodput ledger reads them)
    means = timer.take(steps=3)
    assert log == ["synchronize"] + ["read"] * 9  # one wait for the newest event, then every pair
    assert all(means[f"{p}_s"] >= 0.01 for p in ("data_wait", "forward", "backward", "optimizer"))
    assert timer.totals["forward"] >= 0.03
    log.clear()
    assert timer.take(steps=1)["forward_s"] == 0 and log == []


def test_events_beyond_the_bound_are_read_without_waiting():
    log: list[str] = []
    timer = StepTimer(torch.device("cpu"), event=lambda: HostEvent(log))
    for _ in range(MAX_PENDING + 10):
        with timer.phase("forward"):
            pass
    assert "synchronize" not in log and log.count("read") > 0  # done events were read as they piled up
    timer.take(steps=1)
    assert log.count("read") == MAX_PENDING + 10 and log.count("synchronize") == 1


def test_configured_step_range_writes_a_profiler_trace_per_rank(tmp_path, dataset):
    config = tiny_config(
        tmp_path / "c.toml", dataset, train={"steps": 4}, parallel={"nproc": 2}, observe={"profile_steps": [[2, 3]]}
    )
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        trace = tmp_path / "runs" / "tiny" / "profiles" / f"trace_steps2-3_rank{rank}.json"
        events = json.loads(trace.read_text())["traceEvents"]
        assert any(e.get("name", "").startswith("aten::") for e in events)


def test_bad_profile_range_is_a_one_line_config_error(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset)
    result = run_keel("train", str(config), "--set", "observe.profile_steps=[[5, 2]]", cwd=tmp_path)
    assert result.returncode == 2 and "observe.profile_steps: each range must be [first, last]" in result.stderr
