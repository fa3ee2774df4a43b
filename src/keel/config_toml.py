"""Config files: TOML read into the typed Config with dotted `--set` overrides, and written back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import tomllib
from pydantic import ValidationError

from keel.config import Config, validation_message
from keel.errors import ConfigError
from keel.io import atomic_write_text


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set key.path=value`; the value is read as TOML, or as a bare string (None when empty)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-4")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: the key must be SECTION.NAME, e.g. train.steps")
    if not raw.strip():
        return parts, None  # `--set key=` puts the key back to its default
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `--set` overrides to a raw config table, in order."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for depth, part in enumerate(parts[:-1], start=1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return data


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file into a table, with a one-line error for a missing or malformed file."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass a TOML file such as configs/demo.toml")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw table into a Config, raising ConfigError naming the source and the key."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {validation_message(e, Config)}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a config file (or the defaults when None) and apply `--set` overrides."""
    data = read_toml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    return build_config(apply_overrides(data, list(overrides)), source)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value).replace("infinity", "inf")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # data.mixture, data.licenses: keys are paths, so always quoted
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """Write a two-level table (sections of scalars and lists) as TOML; None values are left out."""
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(v)}" for key, v in table.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as TOML, atomically."""
    atomic_write_text(path, dump_toml(config.model_dump()))
