"""Logging: every rank to RUN_DIR/logs/rank<K>.log, rank 0 also to the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from keel.rundir import RunDir


def setup_logging(run_dir: Path | None, rank: int) -> logging.Logger:
    """Configure the `keel` logger for this process and return it."""
    logger = logging.getLogger("keel")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    if run_dir is not None:
        run = RunDir(run_dir)
        run.logs.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run.rank_log(rank), encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    return logger
