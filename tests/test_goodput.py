"""The goodput ledger accounts for every second of a run's wall time, across restarts and resumes."""

from __future__ import annotations

import time

import pytest

from conftest import run_keel, tiny_config
from keel.io import read_jsonl
from keel.resilience.goodput import CATEGORIES, run_ledger
from keel.rundir import RunDir


def ledger(run) -> dict[str, float]:
    return run_ledger(RunDir(run)).totals


def test_a_restarted_run_accounts_for_its_whole_wall_time(tmp_path, dataset):
    cfg = tiny_config(
        tmp_path / "c.toml",
        dataset,
        train={"steps": 30},
        checkpoint={"every": 5},
        resilience={"inject": "kill:rank=1:step=13"},
    )
    started = time.time()
    result = run_keel("train", str(cfg), "--nproc", "2", cwd=tmp_path)
    wall = time.time() - started
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    totals = ledger(run)
    accounted = sum(totals.values())
    # Everything from the command's start to its last record; what is left is the interpreter's own exit.
    assert 0.85 * wall < accounted <= wall, (totals, wall)
    assert totals["lost"] > 0 and totals["startup"] > 0 and totals["checkpoint"] > 0 and totals["idle"] == 0
    final = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "goodput"][-1]
    assert final["final"] == "finished" and final["ratio"] == pytest.approx(totals["productive"] / accounted, abs=1e-3)
    shown = run_keel("goodput", str(run), cwd=tmp_path)
    assert shown.returncode == 0 and all(name in shown.stdout for name in CATEGORIES), shown.stderr
    printed = float(shown.stdout.split("goodput ")[1].split("%")[0]) / 100  # rounded to 0.1%: compare, not match
    assert printed == pytest.approx(final["ratio"], abs=1.5e-3), shown.stdout
    assert "goodput:" in run_keel("status", str(run), cwd=tmp_path).stdout


def test_time_between_a_preemption_and_the_resume_is_idle(tmp_path, dataset):
    cfg = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 20}, resilience={"inject": "sigterm:step=8"})
    first = run_keel("train", str(cfg), cwd=tmp_path)
    assert first.returncode == 143, first.stderr
    run = tmp_path / "runs" / "tiny"
    before = ledger(run)
    time.sleep(3)
    resumed = run_keel("train", "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = ledger(run)
    assert after["idle"] >= 3 and after["lost"] < 1, after  # the preemption checkpoint lost nothing
    assert after["productive"] > before["productive"]


def test_goodput_of_a_run_without_records_is_one_line(tmp_path, dataset):
    cfg = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 2}, checkpoint={"every": 0})
    assert run_keel("train", str(cfg), "--set", "train.stop_after=1", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    (run / "events.jsonl").write_text("")
    result = run_keel("goodput", str(run), cwd=tmp_path)
    assert result.returncode == 2 and "no goodput records yet" in result.stderr
