"""One training process: under torchrun, in-process for a single process, or under an external launcher."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import traceback
from pathlib import Path

from keel.config import load_config
from keel.distributed.env import DistEnv, init_distributed, shutdown
from keel.errors import KeelError
from keel.io import atomic_write_text
from keel.observe.heartbeat import mark_state
from keel.observe.logs import setup_logging
from keel.rundir import RunDir
from keel.train.trainer import Trainer


def run_worker(run_dir: Path, env: DistEnv, resume: bool) -> None:
    """Train the run in `run_dir` (its resolved config.toml) on this process."""
    cfg = load_config(RunDir(run_dir).config)
    setup_logging(run_dir, env.rank)
    try:
        trainer = Trainer(cfg, env)
        if resume:
            trainer.restore()
        trainer.fit()
    except KeyboardInterrupt:
        if env.is_main:
            mark_state(run_dir, "stopped", reason="interrupted")
        raise
    except Exception as e:
        # The heartbeat must say why the run ended; otherwise it would only look stalled, later.
        if env.is_main:
            mark_state(run_dir, "crashed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise


def log_failure(run_dir: Path, message: str) -> None:
    """Log why this worker stops to its rank log only: `keel train` prints the one line that names it."""
    setup_logging(run_dir, int(os.environ.get("RANK", "0")), console=False).error(message)


def report_error(run_dir: Path, error: KeelError) -> None:
    """Leave a worker's KeelError for `keel train` to print as its own one line."""
    log_failure(run_dir, f"keel: error: {error}")
    atomic_write_text(RunDir(run_dir).worker_error, f"{error}\n")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent (the torchrun agent) dies.

    torchrun starts each worker in its own session, so a SIGKILL of `keel train` or of the agent
    would otherwise leave orphaned workers holding CPUs, GPUs and ports.
    """
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point torchrun starts on every rank: `python -m keel.train.worker RUN_DIR [--resume]`."""
    die_with_parent()
    parser = argparse.ArgumentParser(prog="keel.train.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    code = 0
    try:
        cfg = load_config(RunDir(args.run_dir).config)
        env = init_distributed(cfg.train.device)
        run_worker(args.run_dir, env, args.resume)
    except KeelError as e:
        report_error(args.run_dir, e)
        code = 2
    except Exception:
        log_failure(args.run_dir, traceback.format_exc())  # a bug: its traceback for the log, not the console
        code = 1
    shutdown(code)


if __name__ == "__main__":
    main()
