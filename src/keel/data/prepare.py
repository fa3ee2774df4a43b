"""`keel data prepare`: raw sources -> tokenizer + token shards + manifest.json, committed all at once."""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from keel.config import Config
from keel.data import pool as pools
from keel.data.dedup_store import STORE, DedupStore
from keel.data.drops import DEDUP_DROPS, DROPS, DropWriter
from keel.data.journal import PROGRESS, open_staging, run_key, write_progress
from keel.data.manifest import (
    FORMAT,
    MANIFEST,
    FileEntry,
    Manifest,
    PrepareSettings,
    SourceEntry,
    TokenizerEntry,
    Tombstone,
    write_manifest,
)
from keel.data.pii_ner import require_ner
from keel.data.pool import Job, Result, StagePool, resolve_workers
from keel.data.progress import PassProgress
from keel.data.scan import NOTE, TRAIN_SAMPLE_CHARS, Reading, Scan, readable, scan
from keel.data.shards import ShardWriter
from keel.data.sources import Sources, expand_sources, read_documents
from keel.data.spans import plan
from keel.data.stages import Pipeline, StageSettings, in_order
from keel.data.tokenizer import choose_encoder, eos_id, load_tokenizer, train_tokenizer
from keel.data.tombstones import read_tombstones
from keel.errors import ConfigError, DataError, KeelError
from keel.io import check_writable_dir, filesystem_errors, fsync_path, sha256_file


def prepare_from_config(cfg: Config, log: Callable[[str], None], part: tuple[int, int] | None = None) -> Manifest:
    """Prepare the dataset [prepare] describes (sources, tokenizer, stages, licenses, workers) into data.dataset."""
    d = cfg.prepare
    return prepare_dataset(
        d.sources,
        Path(cfg.data.dataset),
        tokenizer=d.tokenizer,
        vocab_size=d.vocab_size,
        val_fraction=d.val_fraction,
        text_field=d.text_field,
        shard_tokens=d.shard_tokens,
        licenses=d.licenses,
        stages=StageSettings.from_config(d),
        bad_input=d.bad_input,
        part=part,
        workers=d.workers,
        tombstones=d.tombstones,
        log=log,
    )


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
    workers: int = 0,
    tombstones: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Prepare a dataset dir from source globs and return its manifest; an interrupted run of the same resumes."""
    out_dir = Path(out_dir)
    check_output(out_dir)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"prepare.val_fraction ({val_fraction}) must be between 0 and 1")
    if shard_tokens <= 0:
        raise ConfigError(f"prepare.shard_tokens ({shard_tokens}) must be positive")
    if bad_input not in ("error", "skip"):
        raise ConfigError(f"prepare.bad_input ({bad_input!r}) must be 'error' or 'skip'")
    unknown = sorted(set(licenses or {}) - {p for p in sources if not p.startswith("!")})
    if unknown:
        raise ConfigError(
            f"prepare.licenses: {unknown[0]!r} is not one of prepare.sources; key each license by its glob"
        )
    stages = stages or StageSettings()
    if stages.pii and stages.ner_model:
        require_ner(stages.ner_model)  # a missing model is a one-line error now, not a traceback in every worker
    settings = PrepareSettings(
        val_fraction=val_fraction, text_field=text_field, shard_tokens=shard_tokens, bad_input=bad_input, stages=stages
    )
    dead = read_tombstones(tombstones or [])
    reading = Reading(text_field, stages, bad_input == "skip", frozenset(t.sha256 for t in dead))
    # Around the failure handling below, which keeps the staging dir to resume from after a full disk or a kill.
    with filesystem_errors("prepare the dataset", DataError, where=out_dir):
        return _prepare(
            sources, out_dir, tokenizer, vocab_size, licenses or {}, part, workers, log, reading, settings, dead
        )


def _prepare(
    sources: list[str],
    out_dir: Path,
    tokenizer: str | None,
    vocab_size: int,
    licenses: dict[str, str],
    part: tuple[int, int] | None,
    workers: int,
    log: Callable[[str], None],
    reading: Reading,
    settings: PrepareSettings,
    dead: list[Tombstone],
) -> Manifest:
    """prepare_dataset after its argument checks: preflight the sources, then scan, train, tokenize, commit."""
    tok = None if tokenizer is None else load_tokenizer(tokenizer)
    started = time.perf_counter()
    found = expand_sources(sources)
    if part is not None:
        found = _part_of(found, part, tokenizer)
    if not reading.skip_bad:
        check_readable(found)
    workers = resolve_workers(workers, sum(f.size for f in found.files))
    key = run_key(
        {
            "format": FORMAT,
            "settings": settings.model_dump(mode="json"),
            "tokenizer": vocab_size if tokenizer is None else sha256_file(Path(tokenizer)),
            "licenses": licenses,
            "part": part,
            "tombstones": sorted(reading.tombstones),
            "includes": found.includes,
            "excludes": found.excludes,
            "files": [(f.path, f.key, f.source, f.size, os.stat(f.path).st_mtime_ns) for f in found.files],
        }
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging, progress = open_staging(out_dir, key, log)
    pool = StagePool(workers)  # one pool for both passes: its processes start once
    try:
        if progress is None:
            result, tok = _scan_and_tokenizer(
                staging, found, reading, settings.val_fraction, tok, tokenizer, vocab_size, pool, log
            )
            for entry in result.per_source:
                entry["license"] = licenses.get(entry["glob"], "unknown")
            progress = {"key": key, "scan": result.to_json(), "position": None, "writers": None}
            write_progress(staging, progress)  # the scan, the dedup store and the tokenizer are durable from here
        else:
            done = sum(len(w["shards"]) for w in (progress["writers"] or {}).values())
            log(f"resuming {staging}: {done} shards already done")
            result = Scan.from_json(dict(progress["scan"]))
            tok = load_tokenizer(staging / "tokenizer.json")
        manifest = _write(staging, found, result, reading, tok, settings, progress, pool, log)
        manifest.tombstones = dead or None  # carried on, so a prepare from this dataset drops them too
        if tokenizer is not None:
            manifest.tokenizer.given = True  # nothing in it was learned here: a removal's vocabulary report says so
        if part is None or not (staging / STORE).exists():
            shutil.rmtree(staging / STORE, ignore_errors=True)  # the dedup keys outlive the run only for a merge
        else:
            manifest.dedup_store = STORE
        write_manifest(staging, manifest)
        (staging / DROPS).unlink()
        (staging / DEDUP_DROPS).unlink(missing_ok=True)
        (staging / PROGRESS).unlink()
        commit_dataset(staging, out_dir)
    except KeelError:
        # Bad input: nothing to resume. Any other failure (a kill, Ctrl-C, a full disk) keeps staging to resume.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        pool.close()
    splits = manifest.splits
    log(
        f"prepared {out_dir} in {time.perf_counter() - started:.1f} s: "
        f"train {splits['train'].tokens:,} tokens, val {splits['val'].tokens:,} tokens"
    )
    return manifest


def _scan_and_tokenizer(
    staging: Path,
    found: Sources,
    reading: Reading,
    val_fraction: float,
    tok: Tokenizer | None,
    tokenizer: str | None,
    vocab_size: int,
    pool: StagePool,
    log: Callable[[str], None],
) -> tuple[Scan, Tokenizer]:
    """The scan pass (filling the dedup store in staging), then the tokenizer, saved as staging/tokenizer.json."""
    t0 = time.perf_counter()
    total_bytes = sum(f.size for f in found.files)
    sample_fraction = min(1.0, TRAIN_SAMPLE_CHARS / max(total_bytes, 1)) if tok is None else 0.0
    s = reading.stages
    store = DedupStore(staging / STORE, s.dedup_exact, s.dedup_near_threshold, note=NOTE) if _dedups(s) else None
    drops = DropWriter(staging / DROPS)
    try:
        stages = Pipeline(s)
        result = scan(found, reading, val_fraction, sample_fraction, pool, stages, drops, store, pools.TASK_CHARS, log)
    finally:
        drops.close()
        if store is not None:
            store.close()
    log(
        f"found {result.documents} documents in {len(found.files)} files ({total_bytes / 1e6:.1f} MB), "
        f"{result.val} for validation ({time.perf_counter() - t0:.1f} s, {pool.workers} processes)"
    )
    if result.tombstoned:
        where = ", ".join(f"{found.files[f].key}:{o}" for f, o in result.tombstoned[:10])
        more = f" and {len(result.tombstoned) - 10} more" if len(result.tombstoned) > 10 else ""
        log(f"tombstone: dropped {len(result.tombstoned)} documents removed before (content hash): {where}{more}")
    if tok is None:
        t0 = time.perf_counter()
        tok = train_tokenizer(result.sample, vocab_size)
        size = sum(map(len, result.sample)) / 1e6
        log(f"trained a {tok.get_vocab_size()}-token BPE on {size:.1f} MB in {time.perf_counter() - t0:.1f} s")
        tok.save(str(staging / "tokenizer.json"))
    else:
        shutil.copyfile(tokenizer, staging / "tokenizer.json")
    fsync_path(staging / "tokenizer.json")
    result.sample.clear()
    return result, tok


def _dedups(s: StageSettings) -> bool:
    return s.dedup_exact or bool(s.dedup_near_threshold)


def _write(
    staging: Path,
    found: Sources,
    scan: Scan,
    reading: Reading,
    tok: Tokenizer,
    settings: PrepareSettings,
    progress: dict,
    pool: StagePool,
    log: Callable[[str], None],
) -> Manifest:
    """Tokenize into both splits' shards, journaling after every finished shard; return the manifest."""
    vocab, eos = tok.get_vocab_size(), eos_id(tok)
    dtype = "uint16" if vocab <= 2**16 else "uint32"
    writers = {s: ShardWriter(staging, s, np.dtype(dtype), settings.shard_tokens) for s in ("train", "val")}
    for split, state in (progress["writers"] or {}).items():
        writers[split].resume(state)
    after = None if progress["position"] is None else tuple(progress["position"])
    s = reading.stages
    written = Pipeline(s, **(progress.get("written") or {}))  # the write pass's own statistics: PII
    fast, why = choose_encoder(staging / "tokenizer.json", _sample(found, reading))
    log(why)
    job = Job(
        s,
        reading.text_field,
        settings.val_fraction,
        0.0,
        str(staging / "tokenizer.json"),
        fast,
        str(staging / DROPS),
        after,
    )
    spans = plan(found.files, reading.text_field, pools.TASK_CHARS, 0 if after is None else after[0])
    mb = sum(e["bytes"] for e in scan.per_source) / 1e6
    t0 = time.perf_counter()
    reached = PassProgress("tokenize", [f.size for f in found.files], log, first_file=0 if after is None else after[0])
    finished = sum(len(w.shards) for w in writers.values())

    def tokens_written() -> str:
        return f"{sum(w.tokens for w in writers.values()):,} tokens written"

    for r in readable(pool.map(job, spans), reading.skip_bad, Counter()):
        if not r.done:
            continue
        _add(r, scan, writers, written)
        if sum(len(w.shards) for w in writers.values()) > finished:
            finished = sum(len(w.shards) for w in writers.values())
            position = [r.file, r.done[-1].ordinal]
            states = {split: w.checkpoint() for split, w in writers.items()}
            counts = {"stats": written.stats, "first": written.first}
            write_progress(staging, {**progress, "position": position, "writers": states, "written": counts})
        reached.update(r.file, r.through, tokens_written)
    elapsed = time.perf_counter() - t0
    log(f"tokenized {mb:.1f} MB in {elapsed:.1f} s ({mb / max(elapsed, 1e-9):.1f} MB/s, {pool.workers} processes)")
    excluded = [SourceEntry(glob=g, files=n, documents=0, bytes=0) for g, n in found.excludes]
    return Manifest(
        format=FORMAT,
        dtype=dtype,
        tokenizer=TokenizerEntry(
            file="tokenizer.json", sha256=sha256_file(staging / "tokenizer.json"), vocab_size=vocab, eos_id=eos
        ),
        splits={split: writer.finish() for split, writer in writers.items()},
        sources=[SourceEntry.model_validate(e) for e in scan.per_source] + excluded,
        files=[FileEntry(path=f.path, key=f.key, source=f.source) for f in found.files],
        stages=in_order(Pipeline(s, stats=scan.stages, first=scan.first), written),
        skipped=scan.skipped,
        settings=settings,
    )


def _sample(found: Sources, reading: Reading, chars: int = 1 << 18) -> list[str]:
    """The corpus's first documents, about `chars` of text, to check the fast encoder against the tokenizer on."""
    out, size = [], 0
    for source in found.files:
        for _, raw in read_documents(source.path, reading.text_field, Counter()):
            out.append(raw)
            size += len(raw)
            if size >= chars:
                return out
    return out


def _add(r: Result, scan: Scan, writers: dict[str, ShardWriter], written: Pipeline) -> None:
    """Append a span's tokenized documents (each already ending in EOS) to their splits, in order; count PII."""
    out: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    origins: dict[str, list[tuple[int, int]]] = {"train": [], "val": []}
    for d in r.done:
        assert d.ids is not None
        written.count_pii(r.file, d.ordinal, d.pii_size, d.pii_replaced)
        split = scan.split_of((r.file, d.ordinal), d.split_hash)
        out[split].append(d.ids)
        origins[split].append((r.file, d.ordinal))
    for split, docs in out.items():
        writers[split].add(docs, np.array(origins[split], dtype=np.int64).reshape(-1, 2))


def _part_of(found: Sources, part: tuple[int, int], tokenizer: str | None) -> Sources:
    """The i-th of N parts of the input: every N-th file from the i-th, so parts are of similar size."""
    i, n = part
    if not 0 <= i < n:
        raise ConfigError(f"--shard {i}/{n}: the part must be 0 <= i < N")
    if tokenizer is None:
        raise ConfigError("--shard needs prepare.tokenizer: every part must use the same tokenizer for the merge")
    files = found.files[i::n]
    if not files:
        raise DataError(f"--shard {i}/{n}: this part has no files (the sources match {len(found.files)})")
    return Sources(found.includes, found.excludes, files)


def check_readable(found: Sources) -> None:
    """Refuse, before any work, a matched source file this process may not read."""
    for f in found.files:
        if not os.access(f.path, os.R_OK):
            raise DataError(
                f"{f.path}: cannot read this source (permission denied); fix its permissions, exclude it with a "
                "'!GLOB' in prepare.sources, or set prepare.bad_input = \"skip\" to skip and count it"
            )


def check_output(out_dir: Path) -> None:
    """Refuse, before any work, an out_dir that holds anything or cannot be made (under a file, read-only, ...)."""
    with filesystem_errors("check the dataset directory", DataError, where=out_dir):
        check_new(out_dir)
        # The staging dir and the final rename are made in out_dir's parent, so that must be writable too.
        check_writable_dir(out_dir.parent if out_dir.exists() else out_dir, "dataset directory", DataError)


def check_new(out_dir: Path) -> None:
    """Refuse an out_dir that already holds a dataset or anything else."""
    if (out_dir / MANIFEST).exists():
        try:
            held = len(read_tombstones([str(out_dir)]))
        except KeelError:
            held = 0  # an unreadable manifest: the refusal says enough
        keep = f'(with prepare.tombstones = ["{out_dir}"]: it keeps its {held} removed documents out) ' if held else ""
        raise DataError(f"{out_dir} already holds a dataset; choose another data.dataset {keep}or delete it")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not an empty directory; choose another data.dataset or delete it")


def commit_dataset(staging: Path, out_dir: Path) -> None:
    """Move the finished dataset into place in one rename, so out_dir holds all of it or none of it."""
    check_new(out_dir)
    try:
        os.rename(staging, out_dir)  # replaces only an empty directory; anything else fails
    except OSError as e:
        raise DataError(f"cannot create {out_dir} ({e.strerror}); choose another data.dataset") from None
    fsync_path(out_dir.parent)  # make the rename itself durable
