"""The heartbeat and `keel status`: running, stalled, finished and crashed runs are told apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import run_keel, tiny_config
from keel.observe.heartbeat import read_status
from keel.observe.status_view import run_state


def test_finished_run_reports_finished_with_its_last_checkpoint(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 4})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    status = read_status(tmp_path / "runs" / "tiny")
    assert status["state"] == "finished" and status["step"] == 4 and status["last_checkpoint_step"] == 4
    shown = run_keel("status", "runs/tiny", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "FINISHED at step 4/4" in shown.stdout and "last checkpoint: step 4" in shown.stdout
    assert "finish" in shown.stdout


def test_running_run_turns_stalled_when_its_heartbeat_stops(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 100000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(config)],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while read_status(tmp_path / "runs" / "tiny").get("state") != "running":
            assert time.time() < deadline and proc.poll() is None, "the run never reported running"
            time.sleep(0.2)
        assert "RUNNING" in run_keel("status", "runs/tiny", cwd=tmp_path).stdout
        os.killpg(proc.pid, signal.SIGSTOP)  # a hung job: alive, but no longer beating
        time.sleep(3)
        shown = run_keel("status", "runs/tiny", "--stall-timeout", "2", cwd=tmp_path)
        assert "STALLED" in shown.stdout, shown.stdout
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_crashed_run_reports_crashed_with_the_error(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 2})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    # Break the run dir under the trainer's feet: the next checkpoint cannot be written.
    for old in (run / "checkpoints").iterdir():
        subprocess.run(["rm", "-r", str(old)], check=True)
    (run / "checkpoints").rmdir()
    (run / "checkpoints").write_text("not a directory")
    result = run_keel("train", "--resume", str(run), "--set", "train.steps=3", cwd=tmp_path)
    assert result.returncode != 0
    status = read_status(run)
    assert status["state"] == "crashed" and "NotADirectoryError" in status["error"]
    shown = run_keel("status", str(run), cwd=tmp_path).stdout
    assert "CRASHED" in shown and "NotADirectoryError" in shown


def test_stall_is_judged_from_heartbeat_age_only_for_live_states():
    now = 1000.0
    assert run_state({"state": "running", "updated_at": now - 5}, 10, now) == "running"
    assert run_state({"state": "running", "updated_at": now - 50}, 10, now) == "stalled"
    assert run_state({"state": "finished", "updated_at": now - 5000}, 10, now) == "finished"


def test_status_of_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    result = run_keel("status", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a Keel run dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
