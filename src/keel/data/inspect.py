"""`keel data inspect` and `keel data verify`: summarize a prepared dataset; re-hash every shard."""

from __future__ import annotations

from pathlib import Path

from keel.data.manifest import load_manifest, resolve_inside
from keel.errors import DataError
from keel.io import filesystem_errors, sha256_file


def inspect_lines(dataset_dir: Path) -> list[str]:
    """Human-readable summary: splits, sources with licenses, stage statistics, skipped records, tokenizer."""
    m = load_manifest(dataset_dir)
    tok = m.tokenizer
    lines = [
        f"dataset {dataset_dir}: {m.format}, tokens {m.dtype}",
        f"tokenizer {tok.file}: vocab {tok.vocab_size}, eos {tok.eos_id}, sha256 {tok.sha256[:16]}",
    ]
    for split, entry in m.splits.items():
        lines.append(f"{split}: {entry.tokens:,} tokens, {entry.documents:,} documents, {len(entry.shards)} shards")
    for src in m.sources:
        lines.append(
            f"source {src.glob}: license {src.license}, {src.files} files, "
            f"{src.documents} documents, {src.bytes:,} bytes"
        )
    for stage, stats in sorted(m.stages.items()):
        lines.append(f"stage {stage}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(stats.items())))
    for kind, n in sorted(m.skipped.items()):
        lines.append(f"skipped {kind}: {n:,}")
    for removal in m.removals:
        line = f"removal {removal.time}: {len(removal.documents)} documents, shards {removal.shards}"
        if removal.vocabulary is not None:
            line += f", {len(removal.vocabulary)} vocabulary entries learned only from them"
        lines.append(line + (", tokenizer retrained and every shard re-encoded" if removal.retokenized else ""))
    for f in m.files:
        if f.removed:
            lines.append(f"file {f.key}: removed {f.removed}")
    if m.tombstones:
        lines.append(f"tombstones: {len(m.tombstones)} removed documents a prepare given this dataset drops again")
    return lines


def verify_dataset(dataset_dir: Path) -> tuple[list[str], bool]:
    """Re-hash the tokenizer and every shard against the manifest; return report lines and whether all match."""
    m = load_manifest(dataset_dir)  # sizes and presence are checked here; a DataError names the first bad file
    lines, ok = [], True
    entries = [(m.tokenizer.file, m.tokenizer.sha256)]
    entries += [(s.file, s.sha256) for e in m.splits.values() for s in e.shards]
    for name, expected in entries:
        with filesystem_errors("read it to verify the dataset", DataError):
            digest = sha256_file(resolve_inside(Path(dataset_dir), name))
        if digest != expected:
            ok = False
            lines.append(f"CORRUPT {name}: sha256 {digest[:16]}..., manifest says {expected[:16]}...")
    lines.append(f"{'ok' if ok else 'FAILED'}: {len(entries)} files checked in {dataset_dir}")
    return lines, ok
