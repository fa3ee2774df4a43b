"""One training process: under torchrun, in-process for a single process, or under an external launcher."""

from __future__ import annotations

import argparse
import os
import signal
import time
import traceback
from pathlib import Path

from keel.config_toml import load_config
from keel.distributed.env import DistEnv, all_gather_floats, init_distributed, shutdown
from keel.errors import EXIT_REFUSED, KeelError
from keel.io import atomic_write_text
from keel.observe.heartbeat import mark_failed
from keel.observe.logs import setup_logging
from keel.process import die_with_parent
from keel.resilience.preemption import install_handlers
from keel.rundir import RunDir
from keel.train.trainer import Trainer

PEER_GRACE_S = 1.0  # how long a failed rank waits before exiting, so a peer that died first is seen first


def run_worker(run_dir: Path, env: DistEnv, resume: bool) -> str:
    """Train the run in `run_dir` (its resolved config.toml) on this process; returns how the loop ended."""
    cfg = load_config(RunDir(run_dir).config)
    install_handlers(cfg.resilience.preempt_signals)  # first: a signal during start-up must not kill the rank
    setup_logging(run_dir, env.rank)
    # On several machines only node 0 knows whether the run continues, and an agent restarting its workers because
    # another node's failed does not count that as a restart: every rank restores if any rank must.
    rows = all_gather_floats([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), resume])
    attempt, resume = int(max(row[0] for row in rows)), any(row[1] for row in rows)
    try:
        trainer = Trainer(cfg, env)
        if attempt:
            trainer.events("restart", attempt=attempt, world_size=env.world_size)
        if resume or attempt:  # a restarted worker continues from the newest committed checkpoint by itself
            trainer.restore()
    except BaseException as e:
        if env.is_main:  # once the loop runs, its lifecycle callback says why it ended
            mark_failed(run_dir, e)
        raise
    return trainer.fit()


def log_failure(run_dir: Path, message: str) -> None:
    """Log why this worker stops to its rank log only: `keel train` prints the one line that names it."""
    setup_logging(run_dir, int(os.environ.get("RANK", "0")), console=False).error(message)


def report_error(run_dir: Path, error: KeelError) -> None:
    """Leave a worker's KeelError for `keel train` to print as its own one line."""
    log_failure(run_dir, f"keel: error: {error}")
    atomic_write_text(RunDir(run_dir).worker_error, f"{error}\n")


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
        env = init_distributed(cfg.train.device, cfg.distributed.timeout_s)
        run_worker(args.run_dir, env, args.resume)
    except KeelError as e:
        report_error(args.run_dir, e)
        code = EXIT_REFUSED
    except Exception:
        log_failure(args.run_dir, traceback.format_exc())  # its traceback for the log, not the console
        code = 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A peer's death fails this rank's collectives at once: leaving a moment later lets torchrun's agent
            # see, and report, the rank that died first. Its SIGTERM, which ends a failed group, ends this at once.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(PEER_GRACE_S)
    shutdown(code)


if __name__ == "__main__":
    main()
