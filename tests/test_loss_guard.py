"""The loss guard: non-finite steps never reach the optimizer, spikes roll back past their data, divergence stops."""

from __future__ import annotations

import json
import math

import pytest

from conftest import assert_one_line_error, losses, read_metrics, run_keel, tiny_config
from keel.checkpoint.commit import committed_steps
from keel.io import read_jsonl
from keel.observe.heartbeat import read_status


def train(tmp_path, dataset, name, *extra, **sections):
    train_ = {"steps": 30, **sections.pop("train", {})}
    checkpoint = {"every": 5, "keep": 3, **sections.pop("checkpoint", {})}
    cfg = tiny_config(
        tmp_path / f"{name}.toml", dataset, run={"name": name}, train=train_, checkpoint=checkpoint, **sections
    )
    return run_keel("train", str(cfg), *extra, cwd=tmp_path), tmp_path / "runs" / name


def events(run, kind):
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def test_a_nonfinite_step_is_skipped_alike_on_every_rank(tmp_path, dataset):
    one, run1 = train(tmp_path, dataset, "one", resilience={"inject": "nan:step=6"})
    two, run2 = train(tmp_path, dataset, "two", "--nproc", "2", resilience={"inject": "nan:step=6:rank=1"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    for run in (run1, run2):
        assert [e["step"] for e in events(run, "nonfinite")] == [6]
        assert math.isnan(losses(run)[5]) and not any(math.isnan(v) for v in losses(run)[6:])
    # Rank 0's own loss was finite; had it updated while rank 1 skipped, the 2-process run would drift off.
    assert losses(run2)[6:] == pytest.approx(losses(run1)[6:], rel=1e-5)


def test_a_spike_rolls_back_to_the_checkpoint_and_skips_the_batches_since(tmp_path, dataset):
    guard = {"inject": "spike:step=23", "spike_window": 10}
    full, run = train(tmp_path, dataset, "spike", resilience=guard)
    assert full.returncode == 0, full.stderr
    (rollback,) = events(run, "rollback")
    assert (rollback["step"], rollback["to_step"]) == (23, 20)
    assert rollback["skipped_batches"] == [20, 23] and rollback["skipped_samples"] == [160, 184]
    assert "loss spike" in rollback["reason"]
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 31))  # the undone steps were recorded again, once
    rolled = [json.loads(line)["step"] for line in (run / "metrics.rolled_back.jsonl").read_text().splitlines()]
    assert rolled == [21, 22]
    # The guard's state (skip list, running losses) is in the checkpoint: a run stopped after the rollback and
    # resumed trains on exactly as the one that went through.
    part, run2 = train(tmp_path, dataset, "spike2", train={"stop_after": 27}, resilience=guard)
    assert part.returncode == 0, part.stderr
    resumed = run_keel("train", "--resume", str(run2), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run2) == losses(run)


def test_nonfinite_stop_ends_the_run_with_one_line_naming_the_step(tmp_path, dataset):
    result, run = train(tmp_path, dataset, "stop", resilience={"inject": "nan:step=4", "nonfinite": "stop"})
    assert_one_line_error(result, "non-finite loss or gradient norm at step 4", "resilience.nonfinite")
    assert read_status(run)["state"] == "crashed"


def test_a_diverging_run_rolls_back_then_stops_and_never_commits_a_bad_checkpoint(tmp_path, dataset):
    diverge = ["--set", "optim.lr=1e4", "--set", "train.grad_clip=0", "--set", "optim.warmup_steps=0"]
    result, run = train(tmp_path, dataset, "div", *diverge, checkpoint={"every": 1, "keep": 1})
    line = assert_one_line_error(result, "resilience.max_rollbacks")
    assert "rollbacks" in line and "step" in line
    assert len(events(run, "rollback")) == 3
    assert read_status(run)["state"] == "crashed"
    kept = committed_steps(run / "checkpoints")
    assert kept  # retention keeps the newest, and every committed checkpoint is of a step the guard let through
    loss_at = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert all(math.isfinite(loss_at[step]) for step in kept)
