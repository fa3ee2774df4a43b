"""Crash-resume for `keel data prepare`: a staging dir named by what is prepared, and a durable progress file."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from keel.io import atomic_write_json

PROGRESS = "progress.json"


def run_key(what: dict) -> str:
    """A hash of everything that shapes the output (settings, tokenizer, files with sizes and mtimes)."""
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def open_staging(out_dir: Path, key: str, log: Callable[[str], None]) -> tuple[Path, dict | None]:
    """The staging dir for this key and the progress a crashed run left in it (None: start from scratch)."""
    staging = out_dir.parent / f".{out_dir.name}.partial-{key[:16]}"
    for stale in sorted(glob.glob(glob.escape(str(out_dir.parent / f".{out_dir.name}.partial-")) + "*")):
        if Path(stale) != staging:
            log(f"{stale} was left by a prepare of {out_dir} with other settings or sources: starting fresh")
            shutil.rmtree(stale, ignore_errors=True)
    progress = read_progress(staging)
    if progress is not None and progress.get("key") == key:
        return staging, progress
    # No progress: the crash came before the scan was recorded, so nothing in it can be trusted.
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    os.chmod(staging, 0o755)  # a dataset is meant to be shared
    return staging, None


def read_progress(staging: Path) -> dict | None:
    """The last progress written in the staging dir, or None if there is none."""
    try:
        return json.loads((staging / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_progress(staging: Path, progress: dict) -> None:
    """Replace the progress file atomically and durably: after a crash it holds the old or the new state."""
    atomic_write_json(staging / PROGRESS, progress, indent=None)
