"""Raw sources: expand prepare.sources globs into files and read documents out of them."""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from keel.errors import DataError
from keel.io import first_line


@dataclass(frozen=True)
class SourceFile:
    """A matched file: its absolute path, which include glob found it, and a location-independent key."""

    path: str
    source: int
    # The path relative to its glob's fixed prefix: the validation split hashes this, so a corpus
    # moved to another directory splits the same way.
    key: str
    size: int  # bytes, when the sources were expanded (the run key holds it, so a changed file is seen)


@dataclass(frozen=True)
class Sources:
    """The expanded prepare.sources: include globs, exclude globs with the number of files each removed, files."""

    includes: list[str]
    excludes: list[tuple[str, int]]
    files: list[SourceFile]


def expand_sources(patterns: list[str]) -> Sources:
    """Expand globs (recursive `**` allowed); a pattern starting with `!` excludes the files it matches."""
    includes = [p for p in patterns if not p.startswith("!")]
    if not includes:
        raise DataError('prepare.sources: no source globs given, e.g. prepare.sources = ["corpus/**/*.txt"]')
    excludes = [(p, _matches(p[1:])) for p in patterns if p.startswith("!")]
    removed = {p: 0 for p, _ in excludes}
    seen: set[str] = set()
    files: list[SourceFile] = []
    for index, pattern in enumerate(includes):
        matched = _matches(pattern)
        if not matched:
            raise DataError(f"prepare.sources: {pattern!r} matches no files")
        base = _fixed_prefix(os.path.abspath(os.path.expanduser(pattern)))
        for path in sorted(matched):
            if path in seen:
                continue
            seen.add(path)
            hit = next((p for p, found in excludes if path in found), None)
            if hit is not None:
                removed[hit] += 1
                continue
            files.append(SourceFile(path, index, os.path.relpath(path, base), os.path.getsize(path)))
    if not files:
        raise DataError("prepare.sources: every matched file is excluded by a '!' pattern")
    return Sources(includes, [(p, removed[p]) for p, _ in excludes], files)


class BadRecord(DataError):
    """A record (or whole file) that cannot be read; `kind` names the problem for skip-and-count statistics."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple:
        return BadRecord, (self.kind, str(self))  # a pool worker's bad record crosses to the main process


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def read_documents(path: str, text_field: str, skipped: Counter | None = None) -> Iterator[tuple[int, str]]:
    """Yield (ordinal, text) per document: a JSON Lines record, a Parquet row, else the whole file.

    A bad record raises DataError naming file:line, or, when `skipped` is given, is counted there by reason.
    """
    try:
        for item in read_records(path, text_field):
            if isinstance(item, BadRecord):
                if skipped is None:
                    raise item
                skipped[item.kind] += 1
            else:
                yield item
    except BadRecord as e:
        # A file-level problem (unreadable, corrupt, undecodable) ends that file; its good records are kept.
        if skipped is None:
            raise
        skipped[e.kind] += 1


Record = tuple[int, str] | BadRecord  # per-record problems are yielded, so reading can go on after them


def read_records(path: str, text_field: str) -> Iterator[Record]:
    """A file's records in order: (ordinal, text) or a bad record; a file-level problem raises BadRecord."""
    if path.endswith(JSONL_SUFFIXES):
        return _jsonl_documents(path, text_field)
    if path.endswith(".parquet"):
        return _parquet_documents(path, text_field)
    return _whole_file(path)


# Every file-level problem ends with this: the two ways past a file the user cannot fix in place.
SKIP_HINT = "exclude it with a '!GLOB' in prepare.sources, or set prepare.bad_input = \"skip\" to skip and count it"


def unreadable(path: str, e: OSError) -> BadRecord:
    return BadRecord("unreadable_file", f"{path}: cannot read this source ({e.strerror or first_line(e)}); {SKIP_HINT}")


def _whole_file(path: str) -> Iterator[Record]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise unreadable(path, e) from None
    try:
        yield 0, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(
            "invalid_utf8", f"{path}: not valid UTF-8 (byte {e.start}); convert it, or {SKIP_HINT}"
        ) from None


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames decompressed one after another; ending inside a frame raises EOFError, as gzip does.

    zstandard's stream_reader takes a file cut inside a frame for a clean end, so the last lines would be lost
    without a word; a decompressobj per frame says whether its frame ended (`eof`).
    """

    def __init__(self, path: str):
        import zstandard

        self._file = open(path, "rb")
        self._zstd = zstandard
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = None  # the current frame's decompressobj; None between frames
        self._out, self._at = b"", 0  # decompressed bytes, and how many of them were read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while self._at == len(self._out):
            data = self._file.read(1 << 20)
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = memoryview(self._out)[self._at : self._at + n]  # one copy, not two
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as e:
                raise ValueError(f"corrupt zstd data: {e}") from None
            if not self._frame.eof:
                break
            data, self._frame = self._frame.unused_data, None  # the rest starts the next frame
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_lines(path: str) -> BinaryIO:
    """A binary line-iterable stream of the file, decompressing .gz and .zst on the fly (bounded memory)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


def _jsonl_documents(path: str, text_field: str) -> Iterator[Record]:
    lineno = 0
    for block in jsonl_blocks(path):
        yield from parse_lines(block, lineno, path, text_field)
        lineno += block.count(b"\n")


READ_BYTES = 1 << 16  # decompressed per read: a corrupt or cut file loses at most this much before the problem


def jsonl_blocks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """A JSON Lines file decompressed, about `size` bytes of whole lines at a time; a file-level problem raises.

    Before the BadRecord of a problem, the whole lines decompressed so far come out: the records before it are kept.
    """
    lines, chunks, held = 0, [b""], 0  # whole lines yielded; what was read since, and its size
    try:
        f = _open_lines(path)
    except OSError as e:
        raise unreadable(path, e) from None
    with f:
        while True:
            try:
                chunk = f.read(READ_BYTES)
            except (EOFError, gzip.BadGzipFile, zlib.error, ValueError, OSError) as e:
                data = b"".join(chunks)
                cut = data.rfind(b"\n") + 1
                if cut:
                    yield data[:cut]
                raise _stream_error(path, lines + data.count(b"\n", 0, cut), e) from None
            chunks.append(chunk)
            held += len(chunk)
            if held >= size or not chunk:
                data = b"".join(chunks)
                cut = len(data) if not chunk else data.rfind(b"\n") + 1  # the end of the file ends its last line
                if cut:
                    yield data[:cut]
                    lines += data.count(b"\n", 0, cut)
                chunks, held = [data[cut:]], len(data) - cut
            if not chunk:
                return


def _stream_error(path: str, lines: int, e: Exception) -> BadRecord:
    """The file-level problem of a stream that failed after `lines` whole lines."""
    if isinstance(e, EOFError):
        return BadRecord(
            "truncated_file",
            f"{path}: truncated: the compressed data ends before its end marker (after line {lines}); "
            f"copy the whole file again, or {SKIP_HINT}",
        )
    if isinstance(e, (gzip.BadGzipFile, zlib.error, ValueError)):
        return BadRecord("corrupt_compression", f"{path}:{lines + 1}: corrupt compressed data ({e}); {SKIP_HINT}")
    assert isinstance(e, OSError)
    return unreadable(path, e)


def parse_lines(data: bytes, lineno: int, path: str, text_field: str) -> Iterator[Record]:
    """The records of whole JSON Lines lines, numbered on from `lineno` (the number of the line before them)."""
    at = 0
    while at < len(data):
        cut = data.find(b"\n", at) + 1 or len(data)
        lineno += 1
        record = jsonl_record(data[at:cut], lineno, path, text_field)
        at = cut
        if record is not None:
            yield record


def jsonl_record(raw: bytes, lineno: int, path: str, text_field: str) -> Record | None:
    """The document of one JSON Lines line (bytes, with its newline), a bad record, or None for a blank line."""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return BadRecord("invalid_utf8", f"{path}:{lineno}: not valid UTF-8")
    except json.JSONDecodeError as e:
        return BadRecord("invalid_json", f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})")
    return text_of(lineno, record, text_field, f"{path}:{lineno}")


def _parquet_documents(path: str, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise BadRecord(
            "unreadable_parquet", f"{path}: not a readable Parquet file ({first_line(e)}); {SKIP_HINT}"
        ) from None
    except OSError as e:
        raise unreadable(path, e) from None
    if text_field not in pf.schema_arrow.names:
        raise BadRecord(
            "missing_field",
            f"{path}: no column {text_field!r} (has: {', '.join(pf.schema_arrow.names)}); "
            "set prepare.text_field to the column that holds the text",
        )
    row = 0
    # Row-group batches keep memory bounded however large the file is.
    batches = pf.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise BadRecord(
                "corrupt_parquet", f"{path}: row {row}: corrupt Parquet data ({first_line(e)}); {SKIP_HINT}"
            ) from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            yield text_of(row, {text_field: text}, text_field, f"{path}:row {row}")
            row += 1


def text_of(ordinal: int, record: object, text_field: str, where: str) -> Record:
    """The document in a parsed record, or a bad record naming `where` if it has no string text field."""
    if not isinstance(record, dict) or text_field not in record:
        return BadRecord(
            "missing_field",
            f"{where}: no field {text_field!r}; set prepare.text_field to the field that holds the text",
        )
    text = record[text_field]
    if not isinstance(text, str):
        return BadRecord("not_a_string", f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return ordinal, text


def _matches(pattern: str) -> set[str]:
    found = glob.glob(os.path.expanduser(pattern), recursive=True)
    return {os.path.abspath(p) for p in found if os.path.isfile(p)}


def _fixed_prefix(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (a plain file's own directory)."""
    parts = pattern.split(os.sep)
    first_magic = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
    return os.sep.join(parts[:first_magic]) or os.sep
