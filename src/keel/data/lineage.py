"""Lineage and removal: which shards and samples hold a document, and rebuilding shards without it."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.data.manifest import Manifest, Removal, Shard, load_manifest, resolve_inside, write_manifest
from keel.errors import DataError
from keel.io import check_writable_dir, filesystem_errors


@dataclass(frozen=True)
class DocSpan:
    """One document of a split: where it came from and its token range [start, end) in the split's stream."""

    split: str
    file: int
    ordinal: int
    start: int
    end: int


def document_spans(root: Path, manifest: Manifest, split: str) -> list[DocSpan]:
    """Every document of a split in stream order (reads only the small .idx and .docs files)."""
    start, ends, origin = split_index(root, manifest, split)
    return [DocSpan(split, int(o[0]), int(o[1]), int(s), int(e)) for o, s, e in zip(origin, start, ends, strict=True)]


def split_index(root: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A split's documents as arrays: start and end in the split's token stream, and origin (file, ordinal)."""
    starts, origins, base = [], [], 0
    for shard in manifest.splits[split].shards:
        if shard.origins is None:
            raise DataError(f"{root}: shard {shard.file} has no lineage (.docs); prepare the dataset again")
        starts.append(np.load(resolve_inside(root, shard.index)) + base)
        origins.append(np.load(resolve_inside(root, shard.origins)).reshape(-1, 2))
        base += shard.tokens
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    origin = np.concatenate(origins) if origins else np.zeros((0, 2), np.int64)
    ends = np.append(start[1:], base)[: len(start)]  # a split emptied by removals has no documents
    return start, ends, origin


def find_documents(dataset_dir: Path, source: str, ordinal: int | None = None) -> list[DocSpan]:
    """Documents from a source file (absolute path or key), or only the one at `ordinal`; none is a DataError."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    wanted = os.path.abspath(source)
    files = {i for i, f in enumerate(manifest.files) if f.path == wanted or f.key == source}
    if not files:
        raise DataError(f"{root}: no source file {source!r} in the manifest; `keel data inspect` lists the sources")
    gone = [manifest.files[i].removed for i in files if manifest.files[i].removed]
    if len(gone) == len(files):
        raise DataError(f"{root}: source file {source!r} was removed ({gone[0]}); no shard holds its documents")
    with filesystem_errors("read the dataset's lineage", DataError):
        found = [
            d
            for split in manifest.splits
            for d in document_spans(root, manifest, split)
            if d.file in files and (ordinal is None or d.ordinal == ordinal)
        ]
    if found:
        return found
    if ordinal is None:
        raise DataError(
            f"{root}: source file {source!r} has no documents left in the dataset "
            "(quality filters, dedup, tombstones or `keel data remove` dropped them all)"
        )
    keys = {manifest.files[i].key for i in files}
    removed = [r.time for r in manifest.removals if any((k, ordinal) in r.documents for k in keys)]
    if removed:
        raise DataError(f"{root}: document {ordinal} of {source!r} was removed ({removed[0]}); no shard holds it")
    raise DataError(
        f"{root}: no document {ordinal} of {source!r} in the dataset: the file has no such document "
        "(the ordinal is the JSON Lines line number, the Parquet row, 0 for a text file), "
        "or it was empty or dropped by a quality filter, dedup or a tombstone (prepare.tombstones)"
    )


def shards_of(manifest: Manifest, span: DocSpan) -> list[str]:
    """The shard files that hold any token of the document."""
    out, base = [], 0
    for shard in manifest.splits[span.split].shards:
        if base < span.end and span.start < base + shard.tokens:
            out.append(shard.file)
        base += shard.tokens
    return out


def sample_ids(span: DocSpan, seq_len: int) -> range:
    """Sample ids (windows of seq_len + 1 tokens at stride seq_len) that contain any token of the document."""
    first = max(0, (span.start - seq_len - 1) // seq_len + 1)
    return range(first, (span.end - 1) // seq_len + 1)


def remove_documents(dataset_dir: Path, spans: list[DocSpan]) -> list[str]:
    """Rewrite only the shards holding these documents without them; the manifest records the removal last."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    check_writable_dir(root, "dataset", DataError)
    with filesystem_errors("rewrite the dataset (its manifest still names the intact old shards)", DataError, root):
        return rewrite_without(root, manifest, spans, removal_record(manifest, spans))


def removal_record(manifest: Manifest, spans: list[DocSpan]) -> Removal:
    """The manifest's record of removing these documents, stamped now (its shards are filled in by the rewrite)."""
    return Removal(
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        documents=[(manifest.files[d.file].key, d.ordinal) for d in spans],
        shards=[],
    )


def rewrite_without(root: Path, manifest: Manifest, spans: list[DocSpan], removal: Removal) -> list[str]:
    """Rewrite the shards holding these spans, append `removal` to the manifest and commit it; old files go last."""
    changed: list[str] = []
    for split, entry in manifest.splits.items():
        cut = [(d.start, d.end) for d in spans if d.split == split]
        base = 0
        for i, shard in enumerate(entry.shards):
            lo, hi = base, base + shard.tokens
            base = hi
            if any(s < hi and lo < e for s, e in cut):
                changed.append(shard.file)
                entry.shards[i] = _rewrite(root, shard, lo, cut, manifest.token_dtype)
        entry.tokens = sum(s.tokens for s in entry.shards)
        entry.documents = sum(s.documents for s in entry.shards)
    removal.shards = changed
    manifest.removals.append(removal)
    current = set(_all_files(manifest))
    write_manifest(root, manifest)  # the commit point: before it the old shards are intact and still named
    for path in _pending_old(root, changed, current):
        path.unlink(missing_ok=True)
    return changed


def _rewrite(root: Path, shard: Shard, lo: int, cut: list[tuple[int, int]], dtype: type) -> Shard:
    """Write the shard without the cut token ranges under new names; return its new manifest entry."""
    tokens = np.fromfile(resolve_inside(root, shard.file), dtype=dtype)
    starts = np.load(resolve_inside(root, shard.index))
    origins = np.load(resolve_inside(root, shard.origins)).reshape(-1, 2)
    keep = np.ones(len(tokens), dtype=bool)
    for s, e in cut:
        keep[max(s - lo, 0) : max(min(e - lo, len(tokens)), 0)] = False
    alive = keep[starts] if len(starts) else np.zeros(0, bool)
    removed_before = np.cumsum(~keep) - ~keep  # tokens removed before each position
    new_starts = starts[alive] - removed_before[starts[alive]]
    stem = shard.file[: -len(".bin")]
    version = shard.version + 1
    name = f"{stem.split('.r')[0]}.r{version}"
    data = tokens[keep].tobytes()
    for suffix, write in (
        (".bin", lambda f: f.write(data)),
        (".idx", lambda f: np.save(f, new_starts.astype(np.int64))),
        (".docs", lambda f: np.save(f, origins[alive].astype(np.int64))),
    ):
        with open(root / f"{name}{suffix}", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return shard.model_copy(
        update={
            "file": f"{name}.bin",
            "index": f"{name}.idx",
            "origins": f"{name}.docs",
            "tokens": int(keep.sum()),
            "documents": int(alive.sum()),
            "sha256": hashlib.sha256(data).hexdigest(),
            "version": version,
        }
    )


def _all_files(manifest: Manifest) -> list[str]:
    return [name for e in manifest.splits.values() for s in e.shards for name in (s.file, s.index, s.origins) if name]


def _pending_old(root: Path, changed: list[str], current: set[str]) -> list[Path]:
    """Files of the rewritten shards' earlier versions, no longer named by the manifest."""
    out = []
    for file in changed:
        stem = file[: -len(".bin")].split(".r")[0]
        for path in root.glob(f"{stem}*"):
            if path.relative_to(root).as_posix() not in current:
                out.append(path)
    return out
