"""Start N training processes on this machine with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from keel.errors import LaunchError
from keel.io import filesystem_errors
from keel.rundir import RunDir

WORKER_MODULE = "keel.train.worker"


def under_launcher() -> bool:
    """True when this process was started by torchrun (or another launcher that sets RANK/WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def worker_env(nproc: int) -> dict[str, str]:
    """Environment for the workers: threads split over the cores, rendezvous settings that survive restarts."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # A shared rendezvous TCP store fails gloo re-initialisation after a restart (docs/torch-on-cpu.md).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return env


def launch_workers(run_dir: Path, nproc: int, resume: bool) -> int:
    """Run the training workers for `run_dir` under torchrun and return its exit code.

    torchrun's stderr (its error report, the workers' warnings and tracebacks) goes to the run's launcher log; the
    workers' progress lines stay on stdout, and a worker's KeelError comes back through RunDir.worker_error.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        WORKER_MODULE,
        str(run_dir),
    ]
    if resume:
        cmd.append("--resume")
    run = RunDir(run_dir)
    with filesystem_errors("write the launcher log", LaunchError):
        run.worker_error.unlink(missing_ok=True)  # an earlier attempt's, which this one must not report
        log = open(run.launcher_log, "a", encoding="utf-8")
    with log:
        return subprocess.call(cmd, env=worker_env(nproc), stderr=log)


def worker_error(run_dir: Path) -> str | None:
    """The one-line KeelError message a worker stopped with, or None if none did."""
    try:
        return RunDir(run_dir).worker_error.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None
