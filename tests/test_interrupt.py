"""Ctrl-C in the terminal of `keel train`: every rank stops at one step with a checkpoint, exit code 130, stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import read_metrics, run_keel, tiny_config
from keel.observe.heartbeat import read_status


def wait_for_records(run_dir: Path, proc: subprocess.Popen, records: int, timeout: float = 120) -> None:
    """Wait until the run has logged `records` metrics records: it is training."""
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= records):
        assert proc.poll() is None, f"the run exited early with code {proc.returncode}"
        assert time.time() < deadline, "the run never started training"
        time.sleep(0.1)


def still_alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes that have not exited (a zombie has: it only waits to be reaped)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def ctrl_c(tmp_path: Path, dataset: Path, nproc: int, lagging_rank: int | None = None) -> tuple[int, list, str]:
    """Train, press Ctrl-C once it is training; the exit code, the processes left alive, and the output.

    With `lagging_rank`, that worker is paused around the Ctrl-C, as a straggler: the others wait for it in a
    collective when the signal comes.
    """
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 2000}, observe={"log_every": 1})
    with open(tmp_path / "output.log", "w") as output:
        # A session of its own, as a terminal's: Ctrl-C sends SIGINT to its whole foreground process group.
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "train", str(config), "--nproc", str(nproc)],
            cwd=tmp_path,
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    procs: list[psutil.Process] = []
    try:
        wait_for_records(tmp_path / "runs" / "tiny", proc, records=3)
        keel = psutil.Process(proc.pid)
        procs = [keel, *keel.children(recursive=True)]  # torchrun starts its workers in sessions of their own
        commands = {p.pid: " ".join(p.cmdline()) for p in procs}
        workers = {int(p.environ()["RANK"]): p for p in procs if p.cmdline()[1:4] == ["-u", "-m", "keel.train.worker"]}
        assert sorted(workers) == (list(range(nproc)) if nproc > 1 else [])
        if lagging_rank is not None:
            workers[lagging_rank].suspend()
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        if lagging_rank is not None:
            time.sleep(1.0)
            for p in still_alive([workers[lagging_rank]]):
                p.resume()
        code = proc.wait(timeout=60)
        deadline = time.time() + 30
        while still_alive(procs) and time.time() < deadline:
            time.sleep(0.1)
        leftover = [f"{p.pid} {commands[p.pid]}" for p in still_alive(procs)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in still_alive(procs):
            p.kill()
    return code, leftover, (tmp_path / "output.log").read_text()


def assert_stopped(run_dir: Path) -> None:
    """status.json and `keel status` say the run was stopped by an interrupt, at a step it committed."""
    status = read_status(run_dir)
    assert status["state"] == "stopped" and status["reason"].startswith("interrupted"), status
    assert status["last_checkpoint_step"] == status["step"] > 0, status
    shown = run_keel("status", str(run_dir), cwd=run_dir.parent.parent)
    assert shown.returncode == 0 and "STOPPED" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_stops_every_process_and_marks_the_run_stopped(tmp_path, dataset, nproc):
    code, leftover, log = ctrl_c(tmp_path, dataset, nproc)
    assert code == 130, log[-3000:]
    assert leftover == [], log[-3000:]
    assert_stopped(tmp_path / "runs" / "tiny")


def test_ctrl_c_while_a_rank_lags_behind_marks_the_run_stopped(tmp_path, dataset):
    code, leftover, log = ctrl_c(tmp_path, dataset, 2, lagging_rank=1)
    assert code == 130, log[-3000:]
    assert leftover == [], log[-3000:]
    assert_stopped(tmp_path / "runs" / "tiny")
