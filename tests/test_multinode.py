"""Several machines, tested as two "nodes" on 127.0.0.1: two keel train agents meeting in a c10d rendezvous train
exactly as one agent with two processes, restart together, and run under an external torchrun and under Slurm."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, assert_one_line_error, keel_here, losses, read_metrics, run_keel, tiny_config
from keel.config_toml import load_config
from keel.io import read_jsonl
from keel.launch.rendezvous import Nodes, first_host, resolve_nodes
from keel.observe.heartbeat import read_status

TRAIN = {"steps": 16, "eval_every": 8}
SAVE = {"every": 4, "keep": 3}
# One thread per process everywhere, so a node's process computes exactly as one of the reference's two.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def config(tmp_path: Path, dataset: Path, name: str, **sections: dict) -> Path:
    train = {**TRAIN, **sections.pop("train", {})}
    return tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name}, train=train, checkpoint=SAVE, **sections)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keel(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keel", *args], cwd=cwd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Wait for every process; returns (exit code, stderr) of each."""
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise
        results.append((proc.returncode, err))
    return results


def two_nodes(tmp_path: Path, cfg: Path, *extra: str) -> list[tuple[int, str]]:
    """`keel train CONFIG --nnodes 2 --node-rank R --nproc 1 --rdzv-endpoint 127.0.0.1:PORT` for R = 0 and 1."""
    endpoint = f"127.0.0.1:{free_port()}"
    flags = ["--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", endpoint, *extra]
    return finish([keel("train", str(cfg), "--node-rank", str(r), *flags, cwd=tmp_path) for r in (0, 1)])


def events(run: Path) -> list[dict]:
    return read_jsonl(run / "events.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset) -> list[float]:
    """The losses of one keel train with two processes: what two nodes of one process each must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    [(code, err)] = finish([keel("train", str(config(root, dataset, "ref")), "--nproc", "2", cwd=root)])
    assert code == 0, err
    return losses(root / "runs" / "ref")


def test_two_nodes_train_exactly_as_one_node_with_two_processes(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "two")
    for code, err in two_nodes(tmp_path, cfg):
        assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "two"
    got = losses(run)
    assert len(got) == len(reference) == 16
    # Bit for bit: the same global batches, the same reductions, over gloo between the agents' processes.
    assert got == reference, max(abs(a - b) / abs(b) for a, b in zip(got, reference, strict=True))
    start = [e for e in events(run) if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2
    saved = load_config(run / "config.toml")
    assert (saved.parallel.nnodes, saved.parallel.nproc) == (2, 1)
    assert (run / "logs" / "torchrun.log").exists() and (run / "logs" / "torchrun.node1.log").exists()
    assert read_status(run)["state"] == "finished"


@pytest.mark.soak  # a minute of real restarts; run by `make soak`
def test_a_killed_worker_on_one_node_is_restarted_with_the_other_node_and_the_run_finishes(
    tmp_path, dataset, reference
):
    cfg = config(tmp_path, dataset, "kill", resilience={"inject": "kill:rank=1:step=7"})
    # The run began on one machine; two nodes continue it (any process count resumes).
    first = run_keel("train", str(cfg), "--nproc", "2", "--set", "train.stop_after=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # Node 1 need not wait for a run dir that exists, so its agent starts first: the rendezvous orders the agents by
    # address and pid, so rank 0 is on node 1, and the killed rank 1 is node 0's local rank 0.
    endpoint = f"127.0.0.1:{free_port()}"
    flags = ["--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", endpoint]
    node1 = keel("train", str(cfg), "--node-rank", "1", *flags, cwd=tmp_path)
    deadline = time.time() + 60
    while not any("torch.distributed.run" in c.cmdline() for c in psutil.Process(node1.pid).children()):
        assert node1.poll() is None and time.time() < deadline, node1.communicate()
        time.sleep(0.05)
    node0 = keel("train", str(cfg), "--node-rank", "0", *flags, cwd=tmp_path)
    for code, err in finish([node0, node1]):
        assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "kill"
    failed = [e for e in events(run) if e["event"] == "worker_failed"]
    # Node 0's agent reports its killed worker by its global rank; node 1's restarts its own for the rendezvous,
    # without a failure of its own (or, if its worker noticed first, one with exit code 1).
    assert (failed[0]["rank"], failed[0]["exit"], failed[0]["step"]) == (1, "signal SIGKILL", 7), failed
    assert failed[0]["log"].endswith("logs/rank1.log")
    assert "failed (exitcode: -9) local_rank: 0" in (run / "logs" / "torchrun.log").read_text()
    kinds = [e["event"] for e in events(run)]
    assert kinds.count("restart") == 1 and kinds[-1] == "finish"
    assert [e["step"] for e in events(run) if e["event"] == "resume"] == [3, 4]
    assert losses(run) == reference
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 17))


def test_two_external_torchrun_agents_run_keel_train_on_two_nodes(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "ext")
    endpoint = f"127.0.0.1:{free_port()}"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    torchrun += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=ext", "--max-restarts=0"]
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = [
        subprocess.Popen([*torchrun, "-m", "keel", "train", str(cfg)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]  # fmt: skip
    for code, err in finish(agents):
        assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "ext"
    assert losses(run) == reference
    saved = load_config(run / "config.toml")
    assert (saved.parallel.nnodes, saved.parallel.nproc) == (2, 1)  # per machine, as torchrun's LOCAL_WORLD_SIZE


@pytest.mark.soak  # a minute of real restarts; run by `make soak`
def test_an_sbatch_script_runs_under_srun_is_preempted_requeued_and_continues(tmp_path, dataset, reference):
    cfg = config(tmp_path, dataset, "slurm")
    made = run_keel("launch", "slurm", str(cfg), "--nodes", "2", "--gpus-per-node", "1", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(made.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    bin_dir = tmp_path / "bin"  # stand-ins for srun and scontrol, and `keel` as this interpreter runs it
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).symlink_to(ROOT / "tests" / "standins" / tool)
    (bin_dir / "keel").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keel "$@"\n')
    (bin_dir / "keel").chmod(0o755)
    calls = tmp_path / "scontrol.log"
    # What sbatch gives the batch shell on the first of two nodes; MASTER_PORT so two tests never share a port.
    batch_env = {
        **ENV,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "slurm",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "0",
        "MASTER_PORT": str(free_port()),
        "KEEL_SCONTROL_LOG": str(calls),
    }
    run = tmp_path / "runs" / "slurm"
    job = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=batch_env, start_new_session=True)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and any(r.get("step", 0) >= 6 for r in read_metrics(run))):
        assert job.poll() is None and time.time() < deadline, "the job never got to step 6"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does before the time limit
    assert job.wait(timeout=180) == 138
    assert calls.read_text().split() == ["requeue", "4242"]
    status = read_status(run)
    assert status["state"] == "preempted" and status["last_checkpoint_step"] == status["step"] < 16
    node_logs = [(run / "logs" / f"node{node}.log").read_text() for node in (0, 1)]  # each node's, in the run dir
    assert any("step 1/16 | loss" in text for text in node_logs)  # rank 0's progress, on whichever node holds it
    # The requeued job runs the same script: the same keel train CONFIG continues the run to its end.
    assert subprocess.run(["bash", str(script)], cwd=tmp_path, env=batch_env, timeout=300).returncode == 0
    assert calls.read_text().split() == ["requeue", "4242"]  # not requeued again
    assert read_status(run)["state"] == "finished" and losses(run) == reference


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29400"], "--node-rank 2 is outside [0, 2)"),
        (["--nnodes", "2", "--node-rank", "-1", "--rdzv-endpoint", "h:29400"], "--node-rank -1 is outside"),
        (["--nnodes", "0"], "--nnodes 0: a run needs at least one node"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint 'node0' is not HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "node0:99999"], "--rdzv-endpoint 'node0:99999' is not HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "a b:29400"], "--rdzv-endpoint 'a b:29400' is not HOST:PORT"),
        (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    ],
)
def test_bad_multi_node_flags_are_one_line_naming_the_option(tmp_path, dataset, flags, message, monkeypatch, capsys):
    # In-process: the same entry point as the console script, without an interpreter start per case.
    cfg = config(tmp_path, dataset, "bad")
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(keel_here(capsys, "train", str(cfg), *flags), message)
    assert not (tmp_path / "runs").exists()


def test_a_node_waits_for_node_0s_run_dir_and_refuses_another_run(tmp_path, dataset):
    cfg = config(tmp_path, dataset, "join", distributed={"join_timeout_s": 2})
    flags = ["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    [(code, err)] = finish([keel("train", str(cfg), *flags, cwd=tmp_path)])
    line = assert_one_line_error(subprocess.CompletedProcess([], code, "", err), "node 0 has not created it")
    assert "distributed.join_timeout_s (2 s)" in line and "storage every node shares" in line
    assert not (tmp_path / "runs").exists()  # node 1 never creates the run dir
    # Node 0's run dir holds another run (here: one with another learning rate): the key that differs is named.
    assert run_keel("train", str(cfg), "--set", "train.stop_after=1", cwd=tmp_path).returncode == 0
    [(code, err)] = finish([keel("train", str(cfg), *flags, "--set", "optim.lr=0.01", cwd=tmp_path)])
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err), "already holds a run with optim.lr = 0.003")


def test_under_srun_the_slurm_environment_fills_in_the_flags():
    step = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_NODES": "4", "SLURM_NNODES": "8", "SLURM_NODEID": "3"}
    nodelist = {"SLURM_STEP_NODELIST": "gpu-[007-010]-ib,cpu1", "SLURM_JOB_NODELIST": "gpu-[001-008]-ib"}
    assert resolve_nodes(None, None, None, {**step, **nodelist}) == Nodes(4, 3, "gpu-007-ib:29500")
    with_master = {**step, **nodelist, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456"}
    assert resolve_nodes(None, None, None, with_master) == Nodes(4, 3, "10.0.0.5:23456")
    # The flags win over the environment; outside Slurm nothing is guessed.
    assert resolve_nodes(2, 0, "h:1", {**step, **nodelist}) == Nodes(2, 0, "h:1")
    assert resolve_nodes(None, None, None, {"SLURM_NNODES": "4", "SLURM_NODEID": "1"}) == Nodes()
    assert first_host("node[01-04,07],gpu5") == "node01"
    assert first_host("rack[2-3]-n[009-012]") == "rack2-n009"
    assert first_host("login1") == "login1"


def test_a_pytorchjob_pods_own_rank_does_not_make_keel_train_a_worker(tmp_path, dataset):
    # A Kubeflow PyTorchJob sets RANK and WORLD_SIZE for the pod; keel train is still its machine's launcher.
    cfg = config(tmp_path, dataset, "pod", train={"steps": 2, "eval_every": 0})
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    [(code, err)] = finish([keel("train", str(cfg), "--nproc", "2", cwd=tmp_path, env=env)])
    assert code == 0, err[-3000:]
    start = [e for e in events(tmp_path / "runs" / "pod") if e["event"] == "start"]
    assert start[0]["world_size"] == 2
