"""Which source each token of a split came from: the shards' document lineage mapped to prepare.sources globs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.data.lineage import document_spans
from keel.data.manifest import load_manifest


def short_names(paths: Sequence[str]) -> list[str]:
    """Distinct short names for paths or globs: what is left after the directories all of them share."""
    parts = [p.rstrip("/").split("/") for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return ["/".join(p[common:]) for p in parts]


@dataclass(frozen=True)
class SourceMap:
    """A split's documents by start offset, each with the index of the source glob its file matched."""

    names: list[str]  # short metric names, one per include glob of prepare.sources
    globs: list[str]
    starts: np.ndarray  # [documents] start offset of each document in the split's token stream, ascending
    source: np.ndarray  # [documents] index into names; -1 for a file whose glob the manifest does not list

    def of_targets(self, sample_ids: Sequence[int], seq_len: int) -> np.ndarray:
        """[len(sample_ids), seq_len] source index of each target token of these windows (-1: unknown)."""
        # Target k of window i is stream token i * seq_len + 1 + k; it counts to the document that holds it,
        # so a window spanning documents of two sources counts each token to its own source.
        positions = np.asarray(sample_ids, dtype=np.int64)[:, None] * seq_len + 1 + np.arange(seq_len)
        documents = np.searchsorted(self.starts, positions, side="right") - 1
        return np.where(documents >= 0, self.source[np.maximum(documents, 0)], -1)


def source_map(dataset_dir: str | Path, split: str) -> SourceMap | None:
    """The split's SourceMap; None for a dataset without lineage (.docs files), prepared before Keel wrote them."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    if not manifest.files or any(s.origins is None for s in manifest.splits[split].shards):
        return None
    globs = [s.glob for s in manifest.sources if not s.glob.startswith("!")]
    spans = document_spans(root, manifest, split)
    files = np.array([f.source if f.source < len(globs) else -1 for f in manifest.files], dtype=np.int64)
    starts = np.array([d.start for d in spans], dtype=np.int64)
    source = files[np.array([d.file for d in spans], dtype=np.int64)] if spans else np.zeros(0, np.int64)
    return SourceMap(short_names(globs), globs, starts, source)
