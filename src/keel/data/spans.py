"""Cutting the sources into spans that pool workers read and parse themselves, and reading one span.

The main process only plans: it cuts an uncompressed JSON Lines file at line ends about every `size` bytes
(counting the lines before each cut with bytes.count, so every record keeps its line number as its ordinal),
a Parquet file at its row groups, and takes a text file whole. A compressed stream cannot be entered in the
middle, so the main process decompresses compressed JSON Lines and hands over about `size` bytes of whole lines at
a time; the workers parse them, as they parse the lines they read themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from keel.data.sources import (
    JSONL_SUFFIXES,
    SKIP_HINT,
    BadRecord,
    Record,
    SourceFile,
    jsonl_blocks,
    parse_lines,
    read_records,
    text_of,
    unreadable,
)
from keel.io import first_line


class Span(NamedTuple):
    """A piece of one source file for one worker task."""

    file: int  # index into the sources' files
    source: SourceFile
    kind: str  # "lines" (bytes [start, end)), "rows" (row group `start`), "whole", "data" (lines decompressed)
    start: int = 0
    end: int = 0
    first: int = 0  # ordinal of the span's first record, less one for lines (JSON Lines count from 1)
    data: bytes = b""  # "data": whole lines the main process decompressed
    failed: BadRecord | None = None  # a problem found while planning: it ends the file here
    through: int = 0  # bytes of the file read by the end of this span (0 where only the file's end tells)


def plan(files: list[SourceFile], text_field: str, size: int, start_file: int = 0) -> Iterator[Span]:
    """The spans of every file from start_file on, in document order, each about `size` bytes of input."""
    for index in range(start_file, len(files)):
        source = files[index]
        path = source.path
        try:
            if path.endswith(".jsonl"):
                yield from _line_spans(index, source, size)
            elif path.endswith(".parquet"):
                yield from _row_spans(index, source, text_field)
            elif path.endswith(JSONL_SUFFIXES):
                yield from _decompressed(index, source, size)
            else:
                yield Span(index, source, "whole", through=source.size)
        except BadRecord as e:
            yield Span(index, source, "data", failed=e)


def _line_spans(index: int, source: SourceFile, size: int) -> Iterator[Span]:
    try:
        f = open(source.path, "rb")
    except OSError as e:
        raise unreadable(source.path, e) from None
    lines, at = 0, 0
    with f:
        while True:
            try:
                block = f.read(size)
                if block and not block.endswith(b"\n"):
                    block += f.readline()  # end the span at a line end: a line belongs to the span it starts in
            except OSError as e:
                raise unreadable(source.path, e) from None
            if not block:
                return
            yield Span(index, source, "lines", at, at + len(block), lines, through=at + len(block))
            at += len(block)
            lines += block.count(b"\n")


def _row_spans(index: int, source: SourceFile, text_field: str) -> Iterator[Span]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(source.path)
    except pa.ArrowException as e:
        raise BadRecord(
            "unreadable_parquet", f"{source.path}: not a readable Parquet file ({first_line(e)}); {SKIP_HINT}"
        ) from None
    except OSError as e:
        raise unreadable(source.path, e) from None
    names = meta.schema_arrow.names
    if text_field not in names:
        raise BadRecord(
            "missing_field",
            f"{source.path}: no column {text_field!r} (has: {', '.join(names)}); "
            "set prepare.text_field to the column that holds the text",
        )
    row, groups = 0, meta.num_row_groups
    for group in range(groups):
        yield Span(index, source, "rows", group, group + 1, row, through=source.size * (group + 1) // groups)
        row += meta.metadata.row_group(group).num_rows


def _decompressed(index: int, source: SourceFile, size: int) -> Iterator[Span]:
    lines = 0  # before the span
    try:
        for block in jsonl_blocks(source.path, size):
            yield Span(index, source, "data", first=lines, data=block)
            lines += block.count(b"\n")
    except BadRecord as e:
        yield Span(index, source, "data", first=lines, failed=e)


def read_span(span: Span, text_field: str) -> Iterator[Record]:
    """A span's records in order: (ordinal, text) or a bad record; a file-level problem raises BadRecord."""
    if span.kind == "data":
        yield from parse_lines(span.data, span.first, span.source.path, text_field)
        if span.failed is not None:
            raise span.failed
    elif span.kind == "lines":
        yield from _lines(span, text_field)
    elif span.kind == "rows":
        yield from _rows(span, text_field)
    else:
        yield from read_records(span.source.path, text_field)


def _lines(span: Span, text_field: str) -> Iterator[Record]:
    path = span.source.path
    try:
        with open(path, "rb") as f:
            f.seek(span.start)
            data = f.read(span.end - span.start)
    except OSError as e:
        raise unreadable(path, e) from None
    yield from parse_lines(data, span.first, path, text_field)


def _rows(span: Span, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, row = span.source.path, span.first
    try:
        batches = pq.ParquetFile(path).iter_batches(row_groups=[span.start], columns=[text_field], batch_size=1024)
        for batch in batches:
            for text in batch.column(0).to_pylist():
                yield text_of(row, {text_field: text}, text_field, f"{path}:row {row}")
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise BadRecord(
            "corrupt_parquet", f"{path}: row {row}: corrupt Parquet data ({first_line(e)}); {SKIP_HINT}"
        ) from None
