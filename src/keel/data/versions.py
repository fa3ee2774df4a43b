"""A document's token spans in each version of a dataset: now, and before each `keel data remove`."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from keel.data.lineage import DocSpan, find_documents
from keel.data.manifest import load_manifest, manifest_sha256
from keel.errors import DataError


@dataclass(frozen=True)
class Version:
    """One version of a dataset, named by its manifest hash (what a run records), and the document's spans in it."""

    sha256: str
    spans: list[DocSpan]
    split_tokens: dict[str, int]
    label: str  # "now", or which removal it came before


def document_versions(dataset_dir: Path, source: str, ordinal: int | None = None) -> list[Version]:
    """The versions back to the first removal an older Keel or a merge made; a document gone from all is an error."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    try:
        spans, missing = find_documents(root, source, ordinal), None
    except DataError as e:
        spans, missing = [], e  # removed now, but perhaps still in an earlier version
    keys = {f.key for f in manifest.files if f.path == os.path.abspath(source) or f.key == source}
    index = {f.key: i for i, f in reversed(list(enumerate(manifest.files)))}
    now = {split: entry.tokens for split, entry in manifest.splits.items()}
    versions = [Version(manifest_sha256(root), spans, now, "now")]
    for r in reversed(manifest.removals):
        if r.manifest_before is None or r.spans is None or r.split_tokens is None:
            break  # merge dedup, or an older Keel: the version before it is not described
        mine = [
            DocSpan(split, index[key], o, start, end)
            for (key, o), (split, start, end) in zip(r.documents, r.spans, strict=True)
            if key in keys and (ordinal is None or o == ordinal)
        ]
        kept = [] if r.retokenized else [_before(d, r.spans) for d in spans]  # re-encoding moved every token
        spans = sorted(mine + kept, key=lambda d: (d.split, d.start))
        versions.append(Version(r.manifest_before, spans, dict(r.split_tokens), f"before the removal of {r.time}"))
    if missing is not None and not any(v.spans for v in versions):
        raise missing
    return versions


def _before(span: DocSpan, cuts: list[tuple[str, int, int]]) -> DocSpan:
    """A kept document's span in the version before these token ranges were cut from its split."""
    shift = 0
    for _, start, end in sorted(c for c in cuts if c[0] == span.split):
        if start > span.start + shift:
            break
        shift += end - start  # a cut that ended before the document moved it forward by its length
    return replace(span, start=span.start + shift, end=span.end + shift)
