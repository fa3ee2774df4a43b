"""The commit record: written last and atomically, it is what makes a checkpoint exist."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from keel.errors import CheckpointError
from keel.io import atomic_write_json, sha256_file
from keel.rundir import CHECKPOINT_PREFIX, RunDir, step_of

COMMIT_FILE = "commit.json"
FORMAT = "keel-checkpoint/1"


def write_commit(path: Path, *, step: int, world_size: int, **extra: Any) -> dict[str, Any]:
    """Record the step and every file's size and checksum in `path/commit.json`, atomically, last."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMMIT_FILE):
        files[f.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    record = {
        "format": FORMAT,
        "step": step,
        "world_size": world_size,
        "created_at": time.time(),
        **extra,
        "files": files,
    }
    atomic_write_json(path / COMMIT_FILE, record)
    return record


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, its commit record first, so a kill midway never leaves a committed remnant."""
    (path / COMMIT_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def read_commit(path: Path) -> dict[str, Any]:
    """The commit record of a checkpoint directory, or CheckpointError if it is missing or malformed."""
    try:
        record = json.loads((path / COMMIT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {COMMIT_FILE}, so the checkpoint was never committed") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/{COMMIT_FILE}: unreadable commit record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("files"), dict):
        raise CheckpointError(f"{path}/{COMMIT_FILE}: not a {FORMAT} commit record")
    return record


def verify_files(path: Path, record: dict[str, Any], checksums: bool = True) -> None:
    """Check every file the commit record names: present, same size, and (optionally) same checksum."""
    for rel, meta in record["files"].items():
        f = (path / rel).resolve()
        if not f.is_relative_to(path.resolve()):
            raise CheckpointError(f"{path}/{COMMIT_FILE}: file {rel!r} points outside the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        if f.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {rel} is {f.stat().st_size} bytes, the commit record says {meta['bytes']}")
        if checksums and sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {rel} fails its checksum; the file is corrupt")


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` directory under `root`, committed or not, oldest first."""
    found = [(step_of(d), d) for d in Path(root).glob(f"{CHECKPOINT_PREFIX}*") if d.is_dir()]
    return sorted((step, d) for step, d in found if step is not None)


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoints under `root`, oldest first."""
    return [step for step, d in checkpoint_dirs(root) if (d / COMMIT_FILE).is_file()]


def verify_run(run_dir: Path) -> tuple[list[str], bool]:
    """`keel checkpoint verify`: a line per checkpoint (ok, CORRUPT, uncommitted); whether all committed are intact."""
    dirs = checkpoint_dirs(RunDir(run_dir).checkpoints)
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoints under checkpoints/; is it a Keel run dir that has saved?")
    lines, all_ok = [], True
    for _, d in dirs:
        if not (d / COMMIT_FILE).exists():
            lines.append(f"{d.name}: uncommitted (an interrupted save; resume ignores it)")
            continue
        try:
            record = read_commit(d)
            verify_files(d, record)
        except CheckpointError as e:
            all_ok = False
            lines.append(f"{d.name}: CORRUPT: {e}")
            continue
        size = sum(f["bytes"] for f in record["files"].values())
        lines.append(f"{d.name}: ok ({len(record['files'])} files, {size:,} bytes, world size {record['world_size']})")
    return lines, all_ok
