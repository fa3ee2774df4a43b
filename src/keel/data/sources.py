"""Raw sources: expand data.sources globs into files and read documents out of them."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from keel.errors import DataError


@dataclass(frozen=True)
class SourceFile:
    """A matched file: its absolute path, which include glob found it, and a location-independent key."""

    path: str
    source: int
    # The path relative to its glob's fixed prefix: the validation split hashes this, so a corpus
    # moved to another directory splits the same way.
    key: str


@dataclass(frozen=True)
class Sources:
    """The expanded data.sources: include globs, exclude globs with the number of files each removed, files."""

    includes: list[str]
    excludes: list[tuple[str, int]]
    files: list[SourceFile]


def expand_sources(patterns: list[str]) -> Sources:
    """Expand globs (recursive `**` allowed); a pattern starting with `!` excludes the files it matches."""
    includes = [p for p in patterns if not p.startswith("!")]
    if not includes:
        raise DataError('data.sources: no source globs given, e.g. data.sources = ["corpus/**/*.txt"]')
    excludes = [(p, _matches(p[1:])) for p in patterns if p.startswith("!")]
    removed = {p: 0 for p, _ in excludes}
    seen: set[str] = set()
    files: list[SourceFile] = []
    for index, pattern in enumerate(includes):
        matched = _matches(pattern)
        if not matched:
            raise DataError(f"data.sources: {pattern!r} matches no files")
        base = _fixed_prefix(os.path.abspath(os.path.expanduser(pattern)))
        for path in sorted(matched):
            if path in seen:
                continue
            seen.add(path)
            hit = next((p for p, found in excludes if path in found), None)
            if hit is not None:
                removed[hit] += 1
                continue
            files.append(SourceFile(path, index, os.path.relpath(path, base)))
    if not files:
        raise DataError("data.sources: every matched file is excluded by a '!' pattern")
    return Sources(includes, [(p, removed[p]) for p, _ in excludes], files)


def read_documents(path: str, text_field: str) -> Iterator[tuple[int, str]]:
    """Yield (ordinal, text) for each document of a file: one per JSON Lines record, else the whole file."""
    if path.endswith(".jsonl"):
        yield from _jsonl_documents(path, text_field)
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        yield 0, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 (byte {e.start}); convert it, or exclude it with a '!GLOB' in data.sources"
        ) from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f"{path}:{lineno}: no field {text_field!r}; set data.text_field to the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield lineno, text


def _matches(pattern: str) -> set[str]:
    found = glob.glob(os.path.expanduser(pattern), recursive=True)
    return {os.path.abspath(p) for p in found if os.path.isfile(p)}


def _fixed_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (a plain file's own directory)."""
    parts = pattern.split(os.sep)
    first_magic = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
    return os.sep.join(parts[:first_magic]) or os.sep
