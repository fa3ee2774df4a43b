"""The step-time breakdown: data wait, forward, backward, optimizer, eval and checkpoint add up to the step."""

from __future__ import annotations

import statistics

import pytest
import torch

from conftest import read_metrics, run_keel, tiny_config
from keel.observe.step_timer import PHASES, StepTimer


def test_phases_of_a_real_run_add_up_to_its_step_time(tmp_path, dataset):
    config = tiny_config(
        tmp_path / "c.toml", dataset, train={"steps": 30, "eval_every": 10, "global_batch_size": 16},
        checkpoint={"every": 10}, observe={"log_every": 5},
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
