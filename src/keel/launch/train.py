"""`keel train`: preflight in this process, then train here or in N torchrun workers."""

from __future__ import annotations

import logging
from pathlib import Path

from keel.config import Config, load_config
from keel.distributed.env import all_agree, init_distributed, shutdown
from keel.errors import KeelError, LaunchError
from keel.launch.torchrun import launch_workers, under_launcher, worker_error
from keel.observe.heartbeat import mark_state, read_status
from keel.observe.logs import setup_logging
from keel.rundir import RunDir
from keel.train.preflight import reopen_run, start_run
from keel.train.worker import run_worker


def prepare_run(config: Path | None, overrides: list[str], resume: Path | None) -> Config:
    """Resolve the config and create (or reopen, for --resume) the run dir."""
    if resume is not None:
        if config is not None:
            raise KeelError("give either CONFIG or --resume RUN_DIR, not both (a run dir holds its own config)")
        return reopen_run(resume, overrides)
    if config is None:
        raise KeelError("keel train needs a CONFIG file (e.g. configs/demo.toml) or --resume RUN_DIR")
    return start_run(load_config(config, overrides))


def train(config: Path | None, overrides: list[str], resume: Path | None, nproc: int | None) -> int:
    """Run `keel train`; returns the exit code."""
    if nproc is not None:
        overrides = [*overrides, f"parallel.nproc={nproc}"]
    if under_launcher():
        return _train_under_launcher(config, overrides, resume)
    cfg = prepare_run(config, overrides, resume)
    if cfg.parallel.nproc > 1:
        code = launch_workers(cfg.run_dir, cfg.parallel.nproc, resume is not None)
        if code != 0:
            if read_status(cfg.run_dir).get("state") not in ("crashed", "stopped"):
                mark_state(cfg.run_dir, "crashed", error=f"a worker exited with code {code}")
            message = worker_error(cfg.run_dir)
            if message is not None:
                raise KeelError(message)  # the worker's own one line, as if this process had raised it
            run = RunDir(cfg.run_dir)
            raise LaunchError(f"training failed (exit code {code}); see {run.launcher_log} and {run.logs}/rank*.log")
        return 0
    env = init_distributed(cfg.train.device)
    run_worker(cfg.run_dir, env, resume is not None)
    return 0


def _train_under_launcher(config: Path | None, overrides: list[str], resume: Path | None) -> int:
    """Every rank runs this under an external torchrun: rank 0 prepares the run dir, then all train."""
    env = init_distributed("auto")
    overrides = [*overrides, f"parallel.nproc={env.world_size}"]
    cfg, error = None, None
    if env.is_main:
        try:
            cfg = prepare_run(config, overrides, resume)
        except KeelError as e:
            error = e
    if not all_agree(error is None):
        if error is not None:
            raise error
        shutdown(2)
    run_dir = cfg.run_dir if cfg else (resume or load_config(config, overrides).run_dir)
    code = 0
    try:
        run_worker(Path(run_dir), env, resume is not None)
    except KeelError as e:
        setup_logging(None, env.rank)
        logging.getLogger("keel").error(f"keel: error: {e}")
        code = 2
    shutdown(code)
    return code
