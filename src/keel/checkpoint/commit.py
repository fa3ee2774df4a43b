"""The commit record: written last and atomically, it is what makes a checkpoint exist."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from keel.errors import CheckpointError

COMMIT_FILE = "commit.json"
FORMAT = "keel-checkpoint/1"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old content or the new, never a part: tmp, fsync, rename, fsync dir."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_commit(path: Path, *, step: int, world_size: int) -> dict[str, Any]:
    """Record the step and every file's size and checksum in `path/commit.json`, atomically, last."""
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMMIT_FILE):
        files[f.relative_to(path).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    record = {"format": FORMAT, "step": step, "world_size": world_size, "created_at": time.time(), "files": files}
    atomic_write_text(path / COMMIT_FILE, json.dumps(record, indent=1))
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


def committed_steps(root: Path) -> list[int]:
    """Steps of the committed checkpoints under `root`, oldest first."""
    steps = []
    for d in Path(root).glob("step_*"):
        suffix = d.name.removeprefix("step_")
        if suffix.isdigit() and (d / COMMIT_FILE).is_file():
            steps.append(int(suffix))
    return sorted(steps)
