"""A run survives what a cluster does to it, tested with real processes: kills, signals, a stopped rank, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import assert_one_line_error, losses, read_metrics, run_keel, tiny_config
from keel.io import read_jsonl
from keel.observe.heartbeat import read_status

STEPS = {"steps": 30, "eval_every": 10}
SAVE = {"every": 5, "keep": 3}


def config(tmp_path: Path, dataset: Path, name: str, **sections: dict) -> Path:
    train = {**STEPS, **sections.pop("train", {})}
    checkpoint = {**SAVE, **sections.pop("checkpoint", {})}
    return tiny_config(
        tmp_path / f"{name}.toml", dataset, run={"name": name}, train=train, checkpoint=checkpoint, **sections
    )


def events(run: Path) -> list[dict]:
    return read_jsonl(run / "events.jsonl")


def kinds(run: Path) -> list[str]:
    return [e["event"] for e in events(run)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> list[float]:
    """The losses of an uninterrupted 2-process run: what every recovered run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    result = run_keel("train", str(config(root, dataset, "ref")), "--nproc", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    return losses(root / "runs" / "ref")


def leftovers(pids: list[int]) -> list[int]:
    """Which of these processes still run (zombies waiting to be reaped do not)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def start(tmp_path: Path, cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(cfg), "--nproc", "2", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ((run / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.05)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The torchrun workers under `keel train`, by rank."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        if "keel.train.worker" in child.cmdline() and "torch.distributed.run" not in child.cmdline():
            found[int(child.environ()["RANK"])] = child
    return found


# The signal to `keel train` runs by default; to torchrun's agent and to a worker (the same stop, reached another
# way) in `make soak`, to keep the default suite within its time.
@pytest.mark.parametrize(
    "target", ["keel", pytest.param("agent", marks=pytest.mark.soak), pytest.param("worker", marks=pytest.mark.soak)]
)
def test_a_preemption_signal_stops_every_rank_at_one_step_after_a_checkpoint(tmp_path, dataset, reference, target):
    cfg = config(tmp_path, dataset, "pre", checkpoint={"every": 100})
    run = tmp_path / "runs" / "pre"
    proc = start(tmp_path, cfg)
    wait_for_step(run, proc, 8)
    everyone = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    agent = psutil.Process(proc.pid).children()[0]
    pid = {"keel": proc.pid, "agent": agent.pid, "worker": workers(proc)[1].pid}[target]
    sig = signal.SIGUSR1 if target == "worker" else signal.SIGTERM
    os.kill(pid, sig)
    signalled = time.time()
    out, err = proc.communicate(timeout=120)
    status = read_status(run)
    assert status["state"] == "preempted", (status, err)
    assert status["reason"] == f"preempted ({sig.name})"
    step = status["step"]
    assert status["last_checkpoint_step"] == step  # the step it stopped on is committed
    assert time.time() - signalled < 60 and not leftovers(everyone)
    if target == "keel":
        assert proc.returncode == 128 + sig
    stop = [e for e in events(run) if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["step"] == step  # one stop, agreed: every rank at the same step
    resumed = run_keel("train", "--resume", str(run), "--nproc", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == reference


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "kill", resilience={"inject": "kill:rank=1:step=12"})
    result = run_keel("train", str(cfg), "--nproc", "2", cwd=tmp_path)
    run = tmp_path / "runs" / "kill"
    assert result.returncode == 0, result.stderr
    failed = [e for e in events(run) if e["event"] == "worker_failed"]
    assert len(failed) == 1
    assert (failed[0]["rank"], failed[0]["exit"], failed[0]["step"]) == (1, "signal SIGKILL", 12)
    assert failed[0]["log"].endswith("logs/rank1.log")
    assert kinds(run).count("restart") == 1 and kinds(run)[-1] == "finish"
    assert losses(run) == reference
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 31))


def test_a_stopped_rank_is_named_by_the_watchdog_killed_and_the_run_restarts(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "hang", resilience={"hang_timeout_s": 4})
    run = tmp_path / "runs" / "hang"
    proc = start(tmp_path, cfg)
    wait_for_step(run, proc, 8)
    workers(proc)[1].suspend()  # SIGSTOP: the rank neither works nor answers
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    hang = [e for e in events(run) if e["event"] == "hang"]
    assert hang and hang[0]["rank"] == 0 and hang[0]["frozen_ranks"] == [1]
    assert hang[0]["phase"] in ("forward", "backward", "optimizer", "collective")
    log = Path(hang[0]["log"]).read_text()
    assert "every thread's stack" in log and "keel/train/trainer.py" in log
    assert kinds(run)[-1] == "finish" and losses(run) == reference


def test_the_same_step_failing_again_and_again_stops_with_one_line_naming_it(tmp_path, dataset):
    inject = "kill:rank=1:step=7:times=9"
    cfg = config(tmp_path, dataset, "loop", resilience={"inject": inject, "max_restarts": 2})
    result = run_keel("train", str(cfg), "--nproc", "2", cwd=tmp_path)
    line = assert_one_line_error(result, "crash loop: rank 1 (signal SIGKILL) at step 7, 2 times in a row")
    assert "logs/rank1.log" in line
    assert read_status(tmp_path / "runs" / "loop")["state"] == "crashed"


def test_keel_train_config_again_continues_its_run_and_refuses_another(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "again", train={"stop_after": 12})
    first = run_keel("train", str(cfg), "--nproc", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # A requeued job runs the same command: the run continues from its checkpoint (stop_after applied then).
    again = run_keel("train", str(cfg), "--nproc", "2", "--set", "train.stop_after=", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert losses(tmp_path / "runs" / "again") == reference
    other = run_keel("train", str(cfg), "--set", "optim.lr=1e-2", cwd=tmp_path)
    assert_one_line_error(other, "already holds a run with optim.lr = 0.003, not 0.01")


def test_under_an_external_torchrun_a_restarted_worker_continues_the_run(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "ext", resilience={"inject": "kill:rank=0:step=9"})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    result = subprocess.run(
        [*torchrun, "--max-restarts=1", "-m", "keel", "train", str(cfg)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ext"
    assert "restart" in kinds(run) and kinds(run)[-1] == "finish"
    assert losses(run) == reference


def test_stop_after_applies_only_to_the_invocation_that_set_it(tmp_path, dataset):
    cfg = config(tmp_path, dataset, "once", train={"steps": 12, "stop_after": 4})
    assert run_keel("train", str(cfg), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "once"
    assert read_status(run)["step"] == 4
    resumed = run_keel("train", "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert read_status(run)["state"] == "finished" and read_status(run)["step"] == 12


def test_a_resume_after_a_run_without_checkpoints_rolls_its_metrics_back(tmp_path, dataset):
    cfg = config(tmp_path, dataset, "nock", checkpoint={"every": 0}, resilience={"inject": "kill:rank=0:step=6"})
    assert run_keel("train", str(cfg), cwd=tmp_path).returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "nock"
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]
    resumed = run_keel("train", "--resume", str(run), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 31))
    rolled = [json.loads(line)["step"] for line in (run / "metrics.rolled_back.jsonl").read_text().splitlines()]
    assert [s for s in rolled if s > 0] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('resilience.preempt_signals=["SIGNOPE"]', "resilience.preempt_signals: 'SIGNOPE' is not a signal"),
        ('resilience.preempt_signals=["SIGKILL"]', "resilience.preempt_signals: 'SIGKILL' is not a signal"),
        ("resilience.hang_timeout_s=-1", "resilience.hang_timeout_s: Input should be greater than or equal to 0"),
        ("distributed.timeout_s=0", "distributed.timeout_s: Input should be greater than 0"),
        ('resilience.inject="explode:step=3"', "resilience.inject: 'explode:step=3': unknown fault 'explode'"),
        ('resilience.inject="kill:step=3"', "resilience.inject: 'kill:step=3': kill needs rank"),
        ('resilience.inject="kill:rank=5:step=3"', "rank 5 does not exist in a run of 1 processes"),
        ('resilience.inject="nan:step=x"', "resilience.inject: 'nan:step=x': step must be a non-negative integer"),
    ],
)
def test_bad_resilience_settings_are_one_line_naming_the_key(tmp_path, dataset, setting, message):
    cfg = config(tmp_path, dataset, "bad")
    result = run_keel("train", str(cfg), "--set", setting, cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs" / "bad").exists()
