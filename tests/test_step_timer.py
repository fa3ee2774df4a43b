"""The step-time breakdown: data wait, forward, backward, optimizer, eval and checkpoint add up to the step."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from conftest import read_metrics, run_keel, tiny_config
from keel.observe.step_timer import PHASES, StepTimer


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
