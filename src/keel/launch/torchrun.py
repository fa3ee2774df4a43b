"""Start N training processes on this machine with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from keel.errors import LaunchError

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


def launch_workers(run_dir: Path, nproc: int, resume: bool, device: str) -> int:
    """Run the training workers for `run_dir` under torchrun and return its exit code."""
    if device != "cpu" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LaunchError(f"parallel.nproc {nproc} exceeds the {torch.cuda.device_count()} visible GPUs; lower --nproc")
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
    return subprocess.call(cmd, env=worker_env(nproc))
