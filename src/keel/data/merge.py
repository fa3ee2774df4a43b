"""`keel data merge`: join datasets prepared as `--shard i/N` parts into one dataset (shards are copied once)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from keel.data.dedup_join import duplicates_across
from keel.data.dedup_store import DedupStore
from keel.data.lineage import document_spans, remove_documents
from keel.data.manifest import FORMAT, Manifest, SourceEntry, Split, load_manifest, resolve_inside, write_manifest
from keel.data.prepare import check_output, commit_dataset
from keel.errors import DataError
from keel.io import filesystem_errors


def merge_datasets(parts: list[Path], out_dir: Path) -> Manifest:
    """Concatenate the parts' shards split by split, drop cross-part duplicates, sum statistics; one tokenizer."""
    if not parts:
        raise DataError("keel data merge: name the part datasets to merge")
    out_dir = Path(out_dir)
    check_output(out_dir)
    manifests = [load_manifest(p) for p in parts]
    first = manifests[0]
    for path, m in zip(parts, manifests, strict=True):
        if m.tokenizer.sha256 != first.tokenizer.sha256 or m.dtype != first.dtype:
            raise DataError(f"{path}: another tokenizer than {parts[0]}; prepare every part with one prepare.tokenizer")
        _check_lineage(path, m)
    stores = _open_stores(parts, manifests)  # before anything is written: their settings and format
    try:
        with filesystem_errors("merge the datasets", DataError, where=out_dir):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
            try:
                shutil.copyfile(resolve_inside(parts[0], first.tokenizer.file), staging / first.tokenizer.file)
                manifest = _merged(parts, manifests, staging)
                write_manifest(staging, manifest)
                if stores:
                    manifest = _dedup_across_parts(stores, manifests, staging, manifest)
                commit_dataset(staging, out_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    finally:
        for store in stores:
            store.close()
    return manifest


def _check_lineage(path: Path, m: Manifest) -> None:
    """Refuse a part whose shards have no lineage: merged file numbers are written into the .docs files."""
    for split in m.splits.values():
        for shard in split.shards:
            if shard.origins is None:
                raise DataError(f"{path}: shard {shard.file} has no lineage (.docs); prepare the part again")


def _open_stores(parts: list[Path], manifests: list[Manifest]) -> list[DedupStore]:
    """The parts' dedup stores (none if dedup was off); refuse parts prepared with other settings or without them."""
    stages = manifests[0].settings.stages
    exact, near = stages.dedup_exact, stages.dedup_near_threshold
    if not (exact or near):
        return []
    for path, m in zip(parts, manifests, strict=True):
        if m.settings.stages != stages:
            raise DataError(f"{path}: other stage settings than {parts[0]}; prepare every part with the same ones")
        if m.dedup_store is None:
            raise DataError(f"{path}: no dedup keys in the manifest; prepare it again with `--shard i/N`")
    stores: list[DedupStore] = []
    try:
        for path, m in zip(parts, manifests, strict=True):
            assert m.dedup_store is not None
            stores.append(DedupStore(resolve_inside(path, m.dedup_store), exact, near, readonly=True))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


def _dedup_across_parts(
    stores: list[DedupStore], manifests: list[Manifest], staging: Path, manifest: Manifest
) -> Manifest:
    """Drop documents of later parts that duplicate earlier parts' (exact and near, the parts' own settings)."""
    # The parts' dedup logs are joined as they are: no store is filled again. Exact first, as prepare decides.
    drop: dict[tuple[int, int], str] = {}
    with tempfile.TemporaryDirectory(dir=staging) as work:
        found = duplicates_across(stores, Path(work))
    offset = 0
    for store, m, rows in zip(stores, manifests, found, strict=True):
        for kept in store.kept_batches() if rows else ():
            for k in np.flatnonzero(np.isin(kept.rows, list(rows))).tolist():
                drop[(int(kept.files[k]) + offset, int(kept.ordinals[k]))] = rows[int(kept.rows[k])]
        offset += len(m.files)
    if not drop:
        return manifest
    spans = [
        d for split in manifest.splits for d in document_spans(staging, manifest, split) if (d.file, d.ordinal) in drop
    ]
    remove_documents(staging, spans)  # rewrites only the shards that hold them, and records the removal
    manifest = load_manifest(staging)
    for d in spans:
        entry = manifest.stages.setdefault(f"merge.{drop[(d.file, d.ordinal)]}", {})
        entry["documents_dropped"] = entry.get("documents_dropped", 0) + 1
        entry["tokens_dropped"] = entry.get("tokens_dropped", 0) + d.end - d.start
        manifest.sources[manifest.files[d.file].source].documents -= 1
    write_manifest(staging, manifest)
    return manifest


def _merged(parts: list[Path], manifests: list[Manifest], staging: Path) -> Manifest:
    splits: dict[str, Split] = {}
    files = []
    for root, m in zip(parts, manifests, strict=True):
        offset = len(files)
        files += m.files
        for split, entry in m.splits.items():
            out = splits.setdefault(split, Split(tokens=0, documents=0, shards=[]))
            (staging / split).mkdir(exist_ok=True)
            for shard in entry.shards:
                name = f"{split}/{len(out.shards):05d}"
                shutil.copyfile(resolve_inside(root, shard.file), staging / f"{name}.bin")
                shutil.copyfile(resolve_inside(root, shard.index), staging / f"{name}.idx")
                origins = np.load(resolve_inside(root, shard.origins)).reshape(-1, 2)
                origins[:, 0] += offset  # file numbers point into the merged files list
                with open(staging / f"{name}.docs", "wb") as f:
                    np.save(f, origins)
                out.shards.append(
                    shard.model_copy(update={"file": f"{name}.bin", "index": f"{name}.idx", "origins": f"{name}.docs"})
                )
                out.tokens += shard.tokens
                out.documents += shard.documents
    return Manifest(
        format=FORMAT,
        dtype=manifests[0].dtype,
        tokenizer=manifests[0].tokenizer,
        splits=splits,
        sources=_sum_sources([m.sources for m in manifests]),
        files=files,
        stages={k: dict(v) for k, v in _sum_nested([m.stages for m in manifests]).items()},
        skipped=dict(sum((Counter(m.skipped) for m in manifests), Counter())),
        settings=manifests[0].settings,
        merged_from=[str(p) for p in parts],
    )


def _sum_sources(lists: list[list[SourceEntry]]) -> list[SourceEntry]:
    out: dict[str, SourceEntry] = {}
    for sources in lists:
        for s in sources:
            entry = out.setdefault(s.glob, s.model_copy(update={"files": 0, "documents": 0, "bytes": 0}))
            entry.files += s.files
            entry.documents += s.documents
            entry.bytes += s.bytes
    return list(out.values())


def _sum_nested(stats: list[dict[str, dict[str, int]]]) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for part in stats:
        for stage, counts in part.items():
            out.setdefault(stage, Counter()).update(counts)
    return out
