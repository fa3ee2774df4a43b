"""File mechanics every layer shares: atomic writes, hashing, JSON Lines, filesystem errors as one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from keel.errors import KeelError

CHUNK = 8 << 20  # read in 8 MB blocks: bounded memory for files of any size


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's new entries and renames, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so readers see the old content or the new, never a part: tmp, fsync, rename, fsync dir."""
    path = Path(path)
    # Process and thread ids keep two writers of one file (the heartbeat, the watchdog) off each other's tmp.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any, indent: int | None = 1) -> None:
    """atomic_write_bytes for a JSON document."""
    atomic_write_text(path, json.dumps(value, indent=indent))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines file ([] if it does not exist); a line torn by a kill mid-write is skipped."""
    return [record for _, record in jsonl_lines(path) if record is not None]


def jsonl_lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(raw line, record) per line of a JSON Lines file; the record is None for a torn or malformed line."""
    path = Path(path)
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        yield line if line.endswith("\n") else line + "\n", record if isinstance(record, dict) else None


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


FULL_DISK = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large for the file-size limit",
    errno.EDQUOT: "disk quota exceeded",
}


def describe_os_error(e: OSError, action: str, where: Path | str | None = None) -> str:
    """One line naming the path an OSError is about (else `where`), what was being done, and the usual fix."""
    path = e.filename if e.filename is not None else where if where is not None else "?"
    reason = FULL_DISK.get(e.errno) or e.strerror or first_line(e)
    hints = {
        errno.EACCES: "check its permissions or choose another location",
        errno.EPERM: "check its permissions or choose another location",
        errno.EROFS: "the file system is read-only; choose another location",
        errno.ENOTDIR: "a part of the path is a file, not a directory; choose another location",
        errno.EEXIST: "it already exists; choose another location",
        errno.ENOENT: "check that the path exists",
    }
    hint = hints.get(e.errno, "free space or choose another location" if e.errno in FULL_DISK else "")
    return f"{path}: cannot {action} ({reason})" + (f"; {hint}" if hint else "")


@contextmanager
def filesystem_errors(
    action: str, error: type[KeelError] = KeelError, where: Path | str | None = None
) -> Iterator[None]:
    """Turn an OSError raised inside into `error`: one line naming its path, or `where` if it names none."""
    try:
        yield
    except OSError as e:
        raise error(describe_os_error(e, action, where)) from None


def check_writable_dir(path: Path, what: str, error: type[KeelError] = KeelError) -> None:
    """Refuse, before any work, a directory that cannot be created or written (under a file, read-only, ...)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{what} {path}: {existing} is a file, not a directory; choose another location")
    if not os.access(existing, os.W_OK | os.X_OK):
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise error(f"{what} {path}: {existing} is on a read-only file system; choose another location")
        raise error(f"{what} {path}: {existing} is not writable; check its permissions or choose another location")
