"""`keel data prepare`: raw sources -> tokenizer + token shards + manifest.json, committed all at once."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.data.dataset import FORMAT, MANIFEST, write_manifest
from keel.data.shards import ShardWriter
from keel.data.sources import Sources, expand_sources, read_documents
from keel.data.stages import Pipeline, StageSettings
from keel.data.tokenizer import encoding_pieces, eos_id, load_tokenizer, train_tokenizer
from keel.errors import ConfigError, DataError

TRAIN_SAMPLE_CHARS = 16_000_000  # a BPE trained on ~16 MB is as good as on more, in a fraction of the time
BATCH_CHARS = 4_000_000  # text per encode_batch call: keeps both threads busy and memory bounded
PROGRESS_SECONDS = 30.0  # a long tokenization says how far it got this often


@dataclass
class _Scan:
    """What one pass over the corpus learns before anything is written."""

    val_fraction: float
    documents: int = 0
    val: int = 0
    lowest: tuple[float, tuple[int, int]] = (2.0, (-1, -1))  # (split hash, (file, ordinal)) of the first val pick
    highest: tuple[float, tuple[int, int]] = (-1.0, (-1, -1))  # ... and of the last train pick
    sample: list[str] = field(default_factory=list)
    per_source: list[dict] = field(default_factory=list)
    stages: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def split_of(self, key: tuple[int, int], split_hash: float) -> str:
        """The document's split: by its hash, except that each split gets at least one document."""
        if self.val == 0 and key == self.lowest[1]:
            return "val"
        if self.val == self.documents and key == self.highest[1]:
            return "train"
        return "val" if split_hash < self.val_fraction else "train"


def prepare_dataset(
    sources: list[str],
    out_dir: Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    text_field: str = "text",
    shard_tokens: int = 50_000_000,
    licenses: dict[str, str] | None = None,
    stages: StageSettings | None = None,
    bad_input: str = "error",
    part: tuple[int, int] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Prepare a dataset dir from source globs and return its manifest; an existing dataset is never touched."""
    out_dir = Path(out_dir)
    check_new(out_dir)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction ({val_fraction}) must be between 0 and 1")
    if shard_tokens <= 0:
        raise ConfigError(f"data.shard_tokens ({shard_tokens}) must be positive")
    if bad_input not in ("error", "skip"):
        raise ConfigError(f"data.bad_input ({bad_input!r}) must be 'error' or 'skip'")
    unknown = sorted(set(licenses or {}) - {p for p in sources if not p.startswith("!")})
    if unknown:
        raise ConfigError(f"data.licenses: {unknown[0]!r} is not one of data.sources; key each license by its glob")
    tok = None if tokenizer is None else load_tokenizer(tokenizer)
    started = time.perf_counter()
    found = expand_sources(sources)
    if part is not None:
        found = _part_of(found, part, tokenizer)
    reading = _Reading(text_field, stages or StageSettings(), bad_input == "skip")
    total_bytes = sum(os.path.getsize(f.path) for f in found.files)
    sample_fraction = min(1.0, TRAIN_SAMPLE_CHARS / max(total_bytes, 1)) if tok is None else 0.0
    scan = _scan(found, reading, val_fraction, sample_fraction)
    for entry in scan.per_source:
        entry["license"] = (licenses or {}).get(entry["glob"], "unknown")
    log(
        f"found {scan.documents} documents in {len(found.files)} files ({total_bytes / 1e6:.1f} MB), "
        f"{scan.val} for validation ({time.perf_counter() - started:.1f} s)"
    )

    if tok is None:
        t0 = time.perf_counter()
        tok = train_tokenizer(scan.sample, vocab_size)
        size = sum(map(len, scan.sample)) / 1e6
        log(f"trained a {tok.get_vocab_size()}-token BPE on {size:.1f} MB in {time.perf_counter() - t0:.1f} s")
        scan.sample.clear()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        settings = {
            "val_fraction": val_fraction,
            "text_field": text_field,
            "shard_tokens": shard_tokens,
            "bad_input": bad_input,
            "stages": asdict(reading.stages),
        }
        manifest = _write(staging, found, scan, reading, tok, tokenizer, settings, log)
        commit_dataset(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    splits = manifest["splits"]
    log(
        f"prepared {out_dir} in {time.perf_counter() - started:.1f} s: "
        f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens"
    )
    return manifest


def _part_of(found: Sources, part: tuple[int, int], tokenizer: str | None) -> Sources:
    """The i-th of N parts of the input: every N-th file from the i-th, so parts are of similar size."""
    i, n = part
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: the part must be 0 <= i < N")
    if tokenizer is None:
        raise ConfigError("--shard needs data.tokenizer: every part must use the same tokenizer for the merge")
    files = found.files[i::n]
    if not files:
        raise DataError(f"--shard {i}/{n}: this part has no files (the sources match {len(found.files)})")
    return Sources(found.includes, found.excludes, files)


def check_new(out_dir: Path) -> None:
    """Refuse an out_dir that already holds a dataset or anything else."""
    if (out_dir / MANIFEST).exists():
        raise DataError(f"{out_dir} already holds a dataset; choose another data.dataset or delete it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not an empty directory; choose another data.dataset or delete it")


def _doc_hashes(key: str, ordinal: int) -> tuple[float, float]:
    """Two independent uniform numbers in [0, 1) for a document: one picks its split, one its sampling."""
    digest = hashlib.blake2b(f"{key}\0{ordinal}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / 2**64, int.from_bytes(digest[8:], "little") / 2**64


@dataclass(frozen=True)
class _Reading:
    """How documents are read and processed; every pass over the corpus reads them the same way."""

    text_field: str
    stages: StageSettings
    skip_bad: bool


def _documents(
    found: Sources, reading: _Reading, pipeline: Pipeline, skipped: Counter
) -> Iterator[tuple[int, int, str, float, float]]:
    """Every non-empty document that survives the stages, as (file index, ordinal, text, split hash, sample hash)."""
    for index, source in enumerate(found.files):
        for ordinal, raw in read_documents(source.path, reading.text_field, skipped if reading.skip_bad else None):
            if not raw or raw.isspace():
                continue
            text = pipeline.process(raw)
            if text is not None:
                yield (index, ordinal, text, *_doc_hashes(source.key, ordinal))


def _scan(found: Sources, reading: _Reading, val_fraction: float, sample_fraction: float) -> _Scan:
    """Read everything once: catch bad files before work starts, count, and sample text for the tokenizer."""
    scan = _Scan(val_fraction, per_source=[{"glob": g, "files": 0, "documents": 0, "bytes": 0} for g in found.includes])
    for source in found.files:
        scan.per_source[source.source]["files"] += 1
        scan.per_source[source.source]["bytes"] += os.path.getsize(source.path)
    sampled = 0
    # The stages are deterministic in document order, so the write pass makes the same decisions again.
    pipeline, skipped = Pipeline(reading.stages), Counter()
    for index, ordinal, text, split_hash, sample_hash in _documents(found, reading, pipeline, skipped):
        scan.documents += 1
        scan.per_source[found.files[index].source]["documents"] += 1
        scan.lowest = min(scan.lowest, (split_hash, (index, ordinal)))
        scan.highest = max(scan.highest, (split_hash, (index, ordinal)))
        if split_hash < val_fraction:
            scan.val += 1
        elif sample_hash < sample_fraction and sampled < 2 * TRAIN_SAMPLE_CHARS:
            scan.sample.append(text)
            sampled += len(text)
    scan.stages, scan.skipped = pipeline.stats, dict(skipped)
    if scan.documents == 0:
        dropped = sum(e.get("documents_dropped", 0) for e in pipeline.stats.values()) + sum(skipped.values())
        raise DataError(
            f"data.sources: the {len(found.files)} matched files hold no text (empty corpus; "
            f"{dropped} documents were dropped or skipped)"
        )
    if scan.documents == 1:
        raise DataError(
            "data.sources: the corpus is one document, but one is needed for training and one for validation; "
            "split it into several files or JSON Lines records"
        )
    return scan


def _write(
    staging: Path,
    found: Sources,
    scan: _Scan,
    reading: _Reading,
    tok: Tokenizer,
    tokenizer: str | None,
    settings: dict,
    log: Callable[[str], None],
) -> dict:
    """Write tokenizer.json, both splits' shards, and manifest.json last; return the manifest."""
    if tokenizer is None:
        tok.save(str(staging / "tokenizer.json"))
    else:
        shutil.copyfile(tokenizer, staging / "tokenizer.json")
    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    tok.encode_special_tokens = True
    vocab, eos = tok.get_vocab_size(), eos_id(tok)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    writers = {s: ShardWriter(staging, s, np.dtype(dtype), settings["shard_tokens"]) for s in ("train", "val")}

    mb = sum(s["bytes"] for s in scan.per_source) / 1e6
    t0 = last_log = time.perf_counter()
    chars, done, batch = 0, 0, []
    for index, ordinal, text, split_hash, _ in _documents(found, reading, Pipeline(reading.stages), Counter()):
        batch.append((scan.split_of((index, ordinal), split_hash), text, index, ordinal))
        chars += len(text)
        if chars >= BATCH_CHARS:
            _encode(tok, batch, eos, writers)
            done, chars, batch = done + chars, 0, []
            if time.perf_counter() - last_log > PROGRESS_SECONDS:
                last_log = time.perf_counter()
                log(f"tokenized {done / 1e6:.0f} of ~{mb:.0f} MB")
    _encode(tok, batch, eos, writers)
    elapsed = time.perf_counter() - t0
    log(f"tokenized {mb:.1f} MB in {elapsed:.1f} s ({mb / max(elapsed, 1e-9):.1f} MB/s)")

    manifest = {
        "format": FORMAT,
        "dtype": dtype,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": hashlib.sha256((staging / "tokenizer.json").read_bytes()).hexdigest(),
            "vocab_size": vocab,
            "eos_id": eos,
        },
        "splits": {split: writer.finish() for split, writer in writers.items()},
        "sources": scan.per_source + [{"glob": g, "files": n, "documents": 0, "bytes": 0} for g, n in found.excludes],
        # Lineage: each shard's .docs file names documents by (index into this list, ordinal in the file).
        "files": [{"path": f.path, "key": f.key, "source": f.source} for f in found.files],
        "stages": scan.stages,
        "skipped": scan.skipped,
        "settings": settings,
    }
    write_manifest(staging, manifest)
    return manifest


def _encode(
    tok: Tokenizer, batch: list[tuple[str, str, int, int]], eos: int, writers: dict[str, ShardWriter]
) -> None:
    """Encode (split, text, file, ordinal) with the tokenizer's threads; append document + EOS to its split."""
    pieces = [list(encoding_pieces(text)) for _, text, _, _ in batch]
    encodings = iter(tok.encode_batch_fast([p for doc in pieces for p in doc], add_special_tokens=False))
    out: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    origins: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    for (split, _, index, ordinal), doc in zip(batch, pieces, strict=True):
        ids: list[int] = []
        for _ in doc:
            ids.extend(next(encodings).ids)
        ids.append(eos)
        out[split].append(np.array(ids, dtype=np.int64))
        origins[split].append((index, ordinal))
    for split, docs in out.items():
        writers[split].add(docs, np.array(origins[split], dtype=np.int64).reshape(-1, 2))


def commit_dataset(staging: Path, out_dir: Path) -> None:
    """Move the finished dataset into place in one rename, so out_dir holds all of it or none of it."""
    check_new(out_dir)
    try:
        os.rename(staging, out_dir)  # replaces only an empty directory; anything else fails
    except OSError as e:
        raise DataError(f"cannot create {out_dir} ({e.strerror}); choose another data.dataset") from None
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
