"""Tombstones: content hashes of removed documents that every later `keel data prepare` given them drops again."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from keel.config import validation_message
from keel.data.manifest import MANIFEST, Entry, Tombstone
from keel.errors import ConfigError, DataError
from keel.io import atomic_write_json, check_writable_dir, filesystem_errors

FORMAT = "keel-tombstones/1"


class TombstoneFile(Entry):
    """A tombstones file, or the part of a manifest.json that holds them."""

    tombstones: list[Tombstone] | None = None


def read_tombstones(paths: list[str]) -> list[Tombstone]:
    """prepare.tombstones: each path a dataset directory, its manifest.json, or a tombstones file; one per hash."""
    found: dict[str, Tombstone] = {}
    for given in paths:
        path = Path(given).expanduser()
        file = path / MANIFEST if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(
                f"prepare.tombstones: {given} is neither a prepared dataset nor a tombstones file; name a dataset "
                "that `keel data remove` removed documents from, or the file `keel data remove --tombstones` wrote"
            )
        for tombstone in _read(file) or []:
            found.setdefault(tombstone.sha256, tombstone)
    return list(found.values())


def _read(file: Path, what: str = "prepare.tombstones") -> list[Tombstone] | None:
    with filesystem_errors("read the tombstones", DataError):
        raw = file.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what}: {file} is not valid JSON ({e})") from None
    if not isinstance(data, dict) or ("tombstones" not in data and "format" not in data):
        raise DataError(f'{what}: {file} has no "tombstones" list; is it a tombstones file?')
    try:
        return TombstoneFile.model_validate({"tombstones": data.get("tombstones")}).tombstones
    except ValidationError as e:
        raise DataError(f"{what}: {file}: {validation_message(e, TombstoneFile)}") from None


def check_tombstones_file(path: Path) -> None:
    """Before a removal changes anything: the file `--tombstones` names is a tombstones file, or can be made."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--tombstones {path} is a directory; name a file, e.g. {path / 'tombstones.json'}")
    if path.exists():
        _read(path, "--tombstones")
    check_writable_dir(path.parent, "--tombstones", DataError)


def add_to_file(path: Path, tombstones: list[Tombstone]) -> int:
    """Add tombstones to a tombstones file (made if missing, replaced atomically); returns how many it holds."""
    path = Path(path)
    have = (_read(path, "--tombstones") or []) if path.exists() else []
    known = {t.sha256 for t in have}
    merged = have + [t for t in tombstones if t.sha256 not in known]
    with filesystem_errors("write the tombstones file", DataError, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"format": FORMAT, "tombstones": [t.model_dump(mode="json") for t in merged]})
    return len(merged)
