"""Logging: every rank to RUN_DIR/logs/rank<K>.log, rank 0 also to the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from keel.rundir import RunDir


def setup_logging(run_dir: Path | None, rank: int, console: bool = True) -> logging.Logger:
    """Configure the `keel` logger for this process (console: rank 0 also prints) and return it."""
    logger = logging.getLogger("keel")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if console and rank == 0:
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)
    if run_dir is not None:
        run = RunDir(run_dir)
        run.logs.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run.rank_log(rank), encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file)
    return logger
