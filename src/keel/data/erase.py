"""`keel data remove`: a data-subject removal that reaches the shards, the manifest, later prepares, the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keel.data.dataset import TokenDataset
from keel.data.lineage import DocSpan, removal_record, rewrite_without
from keel.data.manifest import (
    Manifest,
    Removal,
    Shard,
    Tombstone,
    load_manifest,
    manifest_sha256,
    resolve_inside,
    write_manifest,
)
from keel.data.retokenize import retokenize
from keel.data.sources import read_documents
from keel.data.stages import clean, content_hash
from keel.data.tokenizer import load_tokenizer
from keel.data.vocab import learned_only_from
from keel.errors import DataError
from keel.io import check_writable_dir, filesystem_errors


@dataclass(frozen=True)
class Erased:
    """What a removal did and what it could not make exact."""

    removal: Removal  # its record in the manifest
    vocabulary: list[str]  # the old tokenizer's entries learned only from the removed text
    why_none: str | None  # why the tokenizer cannot have learned anything from the removed text
    remaining: list[str]  # those the retrained tokenizer learned again from the kept text
    unmatched: list[str]  # key:ordinal of documents whose tombstone hashes the scrubbed text (source gone or changed)


def erase_documents(
    dataset_dir: Path,
    spans: list[DocSpan],
    *,
    whole_files: bool = False,
    retrain: bool = False,
    log: Callable[[str], None] = print,
) -> Erased:
    """Remove documents: rewrite their shards (or re-encode all), record tombstones and the removal, commit last."""
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    check_writable_dir(root, "dataset", DataError)
    with filesystem_errors("remove the documents (the manifest still names the intact dataset)", DataError, root):
        return _erase(root, manifest, spans, whole_files, retrain, log)


def _erase(
    root: Path, manifest: Manifest, spans: list[DocSpan], whole_files: bool, retrain: bool, log: Callable[[str], None]
) -> Erased:
    """erase_documents after its checks: everything is decided before the first write, then written, commit last."""
    tok = load_tokenizer(resolve_inside(root, manifest.tokenizer.file))
    data = {split: TokenDataset(root, split) for split in manifest.splits}
    ids = [data[d.split].read(d.start, d.end - d.start) for d in spans]
    texts = [tok.decode(i[:-1].tolist(), skip_special_tokens=False) for i in ids]  # each document ends in EOS
    originals = [_source_text(manifest, d, text) for d, text in zip(spans, texts, strict=True)]
    removal = removal_record(manifest, spans)
    removal.manifest_before = manifest_sha256(root)
    removal.spans = [(d.split, d.start, d.end) for d in spans]
    removal.split_tokens = {split: entry.tokens for split, entry in manifest.splits.items()}
    removal.tombstones = [content_hash(o or t) for o, t in zip(originals, texts, strict=True)]
    learned = learned_only_from(root, manifest, spans, tok)
    if retrain and learned.why_none:
        raise DataError(
            f"--retrain-tokenizer: nothing in {root}'s tokenizer was learned from the removed text "
            f"({learned.why_none}); remove without --retrain-tokenizer"
        )
    removal.vocabulary = learned.ids
    unmatched = [f"{k}:{o}" for (k, o), text in zip(removal.documents, originals, strict=True) if text is None]
    _account(manifest, spans, removal, whole_files)
    shown = sorted(removal.vocabulary, key=lambda i: (-len(tok.id_to_token(i)), i))  # the longest, most telling first
    entries = [tok.id_to_token(i) for i in shown]
    vocabulary = [tok.decode([i], skip_special_tokens=False) for i in shown]  # as text, not bytes
    if not retrain:
        rewrite_without(root, manifest, spans, removal)
        return Erased(removal, vocabulary, learned.why_none, [], unmatched)
    old = [manifest.tokenizer.file] + [n for e in manifest.splits.values() for s in e.shards for n in _names(s)]
    removal.shards = [s.file for e in manifest.splits.values() for s in e.shards]
    removal.retokenized = True
    new = retokenize(root, manifest, {(d.split, d.start) for d in spans}, tok, log)
    manifest.removals.append(removal)
    write_manifest(root, manifest)  # the commit point: before it the old version is intact and still named
    _delete(root, old)
    remaining = [text for text, t in zip(vocabulary, entries, strict=True) if new.token_to_id(t) is not None]
    return Erased(removal, vocabulary, None, remaining, unmatched)


def _names(shard: Shard) -> list[str]:
    return [n for n in (shard.file, shard.index, shard.origins) if n]


def _delete(root: Path, names: list[str]) -> None:
    """Delete the old version's files, then the directories they leave empty (deepest first)."""
    dirs = set()
    for name in names:
        path = resolve_inside(root, name)
        path.unlink(missing_ok=True)
        dirs.update(p for p in path.parents if p != root and p.is_relative_to(root))
    for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _source_text(manifest: Manifest, span: DocSpan, tokenized: str) -> str | None:
    """The text to hash for the tombstone: the tokenized text, or where PII scrubbing changed it, the source's."""
    stages = manifest.settings.stages
    if not stages.pii:
        return tokenized  # normalization alone does not change the NFKC content hash
    try:
        for ordinal, raw in read_documents(manifest.files[span.file].path, manifest.settings.text_field):
            if ordinal == span.ordinal:
                return raw if clean(raw, stages)[0] == tokenized else None
    except (DataError, OSError):
        pass  # the source is gone or unreadable: the caller hashes what was tokenized and says so
    return None


def _account(manifest: Manifest, spans: list[DocSpan], removal: Removal, whole_files: bool) -> None:
    """Count the removal as a stage and in its sources, add its tombstones, mark whole files removed."""
    stage = manifest.stages.setdefault("remove", {})
    stage["documents_dropped"] = stage.get("documents_dropped", 0) + len(spans)
    stage["tokens_dropped"] = stage.get("tokens_dropped", 0) + sum(d.end - d.start for d in spans)
    for d in spans:
        manifest.sources[manifest.files[d.file].source].documents -= 1
        if whole_files:
            manifest.files[d.file].removed = removal.time
    known = {t.sha256 for t in manifest.tombstones or []}
    new = [
        Tombstone(sha256=h, key=key, ordinal=ordinal, time=removal.time)
        for h, (key, ordinal) in zip(removal.tombstones or [], removal.documents, strict=True)
        if h not in known
    ]
    manifest.tombstones = (manifest.tombstones or []) + list({t.sha256: t for t in new}.values())


def erased_lines(erased: Erased, dataset: Path, whole_files: bool) -> list[str]:
    """What `keel data remove` says: what changed, the tombstones, the vocabulary, and the runs it leaves behind."""
    r = erased.removal
    n = len(r.documents)
    if r.retokenized:
        lines = [f"removed {n} documents; re-encoded every shard with a tokenizer trained on the kept text"]
    else:
        lines = [f"removed {n} documents; rewrote {len(r.shards)} shards: {', '.join(r.shards)}"]
    if whole_files:
        files = sorted({key for key, _ in r.documents})
        lines.append(f"source files marked removed in the manifest: {', '.join(files)}")
    lines.append(
        f"tombstones: {n} content hashes recorded in {dataset}/manifest.json; a prepare with "
        f'prepare.tombstones = ["{dataset}"] drops these documents again, wherever their files are'
    )
    lines += [
        f"tombstone of {doc}: its source is gone or changed, so it hashes the PII-scrubbed text; a prepare drops "
        "the document again only where scrubbing gives the same text"
        for doc in erased.unmatched
    ]
    shown = ", ".join(repr(t) for t in erased.vocabulary[:20]) + (", ..." if len(erased.vocabulary) > 20 else "")
    if not erased.vocabulary:
        why = f" ({erased.why_none})" if erased.why_none else ""
        lines.append(f"vocabulary: no tokenizer entry was learned only from the removed text{why}")
    elif not r.retokenized:
        lines.append(
            f"vocabulary: {len(erased.vocabulary)} tokenizer entries were learned only from the removed text: "
            f"{shown}; --retrain-tokenizer trains the tokenizer again on the kept text and re-encodes every shard"
        )
    else:
        again = f"; {len(erased.remaining)} learned again from the kept text: {erased.remaining}"
        gone = f"vocabulary: {len(erased.vocabulary)} entries learned only from the removed text ({shown}) are gone"
        lines.append(gone + (again if erased.remaining else ""))
    lines.append(
        "runs trained before this removal read the old version: their resume refuses the changed manifest"
        + (" (and their tokenizer is not the new one)" if r.retokenized else "")
        + "; `keel data lineage DATASET --source FILE --run RUN_DIR` says which steps and checkpoints saw it"
    )
    return lines
