"""keel data prepare at scale: a process pool, crash-resume, on-disk dedup state, dedup across --shard parts."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

import keel.data.prepare
from conftest import assert_one_line_error, near_copy, quiet, random_document, run_keel
from keel.cli import app
from keel.data.dedup_store import DedupStore, Keys
from keel.data.manifest import Manifest, load_manifest
from keel.data.merge import merge_datasets
from keel.data.partitions import Partitions, grouped
from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings
from keel.errors import DataError

STAGES = StageSettings(normalize="NFC", min_words=5, dedup_exact=True, dedup_near_threshold=0.8, pii=True)


def _corpus(root: Path, files: int = 8, docs: int = 30, seed: int = 0) -> list[str]:
    """JSON Lines files with an exact and a near duplicate inside the corpus; returns the source globs."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    first = random_document(rng, 150)
    for f in range(files):
        texts = [random_document(rng, 150) for _ in range(docs)] + ([first] if f == 0 else [])
        if f == files - 1:
            texts += [first, near_copy(first), "mail a.b@example.org " + random_document(rng, 20)]
        (root / f"{f:02d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [str(root / "*.jsonl")]


def _tokenizer(tmp_path: Path, sources: list[str]) -> str:
    prepare_dataset(sources, tmp_path / "tok", vocab_size=400, log=quiet)
    return str(tmp_path / "tok" / "tokenizer.json")


def _fingerprint(dataset: Path) -> dict[str, str]:
    """The SHA-256 of every file of a dataset, by relative path."""
    return {
        p.relative_to(dataset).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dataset.rglob("*"))
        if p.is_file()
    }


def test_a_pool_of_two_workers_writes_the_same_bytes_as_one(tmp_path, monkeypatch):
    sources = _corpus(tmp_path / "raw")
    tok = _tokenizer(tmp_path, sources)
    monkeypatch.setattr("keel.data.pool.TASK_CHARS", 4000)  # many small tasks, so both workers get some
    logs: dict[int, list[str]] = {1: [], 2: []}
    for n in (1, 2):
        prepare_dataset(
            sources, tmp_path / f"w{n}", tokenizer=tok, shard_tokens=3000, stages=STAGES, workers=n, log=logs[n].append
        )
    assert any("2 processes" in line for line in logs[2]) and any("1 processes" in line for line in logs[1])
    assert _fingerprint(tmp_path / "w1") == _fingerprint(tmp_path / "w2")
    manifest = load_manifest(tmp_path / "w2")
    assert manifest.stages["dedup_exact"]["documents_dropped"] == 1
    assert manifest.stages["dedup_near"]["documents_dropped"] == 1
    assert len(manifest.splits["train"].shards) > 3


_CRASHY = """
import sys, time
import keel.data.pool, keel.data.prepare
from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings
from keel.errors import DataError
keel.data.pool.TASK_CHARS = 3000
original = keel.data.prepare._add
def slow_add(*args):
    original(*args)
    time.sleep(0.15)  # slow enough that the parent can kill it between finished shards
keel.data.prepare._add = slow_add
stages = StageSettings(dedup_exact=True, dedup_near_threshold=0.8)
prepare_dataset([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], shard_tokens=1500, stages=stages, workers=1)
"""


def _done_shards(progress: Path) -> list[dict]:
    try:
        state = json.loads(progress.read_text())
    except (OSError, ValueError):
        return []
    return [s for w in (state.get("writers") or {}).values() for s in w["shards"]]


def test_prepare_killed_mid_run_resumes_without_rewriting_finished_shards(tmp_path):
    sources = _corpus(tmp_path / "raw", files=10, docs=40)
    tok = _tokenizer(tmp_path, sources)
    stages = StageSettings(dedup_exact=True, dedup_near_threshold=0.8)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _CRASHY, sources[0], str(out), tok], env=env)
    deadline, done = time.monotonic() + 120, []
    while len(done) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        done = [s for p in tmp_path.glob(".out.partial-*/progress.json") for s in _done_shards(p)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(done) >= 2 and not out.exists(), "the run finished or never got 2 shards done before the kill"
    [staging] = tmp_path.glob(".out.partial-*")
    before = {s[k]: os.stat(staging / s[k]) for s in done for k in ("file", "index", "origins")}

    logged: list[str] = []
    prepare_dataset(sources, out, tokenizer=tok, shard_tokens=1500, stages=stages, log=logged.append)
    resumed = [line for line in logged if line.startswith("resuming ")]
    assert resumed and resumed[0].endswith("shards already done") and "found " not in " ".join(logged)
    assert int(resumed[0].split(": ")[-1].split()[0]) >= len(done)
    for name, st in before.items():
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size), name

    prepare_dataset(sources, tmp_path / "whole", tokenizer=tok, shard_tokens=1500, stages=stages, log=quiet)
    assert _fingerprint(out) == _fingerprint(tmp_path / "whole")


def test_changed_settings_after_a_crash_start_fresh_and_say_so(tmp_path, monkeypatch):
    sources = _corpus(tmp_path / "raw", files=2, docs=5)

    def crash(*_: object) -> None:
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr("keel.data.prepare._add", crash)
        with pytest.raises(RuntimeError):
            prepare_dataset(sources, tmp_path / "out", vocab_size=300, log=quiet)
    logged: list[str] = []
    prepare_dataset(sources, tmp_path / "out", vocab_size=300, shard_tokens=999, log=logged.append)
    assert any("with other settings or sources: starting fresh" in line for line in logged)
    assert not any(line.startswith("resuming") for line in logged)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_dedup_state_lives_on_disk_and_ram_does_not_grow_with_documents(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.partitions.BUFFER_BYTES", 1 << 20)  # keys waiting in RAM: reached in 3 batches
    monkeypatch.setattr("keel.data.dedup_sort.BUDGET", 1 << 20)  # a partition read at once
    store = DedupStore(tmp_path / "d", exact=True, near_threshold=0.8)
    rng = np.random.default_rng(0)
    bands = store.bands

    def feed(lo: int, hi: int) -> None:
        for start in range(lo, hi, 4000):  # random keys, and a copy of the batch's first document: 1 in 4000 dropped
            n = min(4000, hi - start)
            digests, keys = bytearray(rng.bytes(16 * n)), bytearray(rng.bytes(8 * bands * n))
            digests[-16:], keys[-8 * bands :] = digests[:16], keys[: 8 * bands]
            store.add(
                [
                    Keys(
                        0,
                        start + i,
                        bytes(digests[16 * i : 16 * i + 16]),
                        bytes(keys[8 * bands * i : 8 * bands * (i + 1)]),
                    )
                    for i in range(n)
                ]
            )

    def private() -> int:
        info = psutil.Process().memory_info()
        return info.rss - info.shared  # file pages the kernel caches are not the process's own

    feed(0, 40000)
    before = private()
    feed(40000, 240000)
    growth = private() - before
    # In RAM, 200,000 more documents would hold >= 20 MB of digests and band keys alone.
    assert growth < 6e6, f"private memory grew {growth / 1e6:.1f} MB for 200,000 documents"
    assert store.bytes_on_disk() >= 240_000 * (16 + 8 * bands)
    peak, kept = 0, 0
    for run in store.decide(batch=10_000):
        peak = max(peak, private() - before)
        kept += int((run.verdicts == 0).sum())
    assert peak < 12e6, f"deciding 240,000 documents took {peak / 1e6:.1f} MB of private memory"
    store.close()
    assert kept == store.kept == 240_000 - 60
    assert store.bytes_on_disk() >= store.kept * (4 + 16 + 8 * bands)
    assert not [v for v in vars(store).values() if isinstance(v, (list, dict, set)) and len(v) > 3]


def test_merge_drops_duplicates_across_parts_and_verify_passes(tmp_path):
    rng = random.Random(7)
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = [random_document(rng, 150) for _ in range(40)]
    # Parts take every other file: files 0, 2 go to part 0; files 1, 3 to part 1.
    files = [texts[:10], texts[10:20], texts[20:30], texts[30:40] + [texts[3], near_copy(texts[25])]]
    for i, docs in enumerate(files):
        (raw / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    sources = [str(raw / "*.jsonl")]
    tok = _tokenizer(tmp_path, sources)
    stages = StageSettings(dedup_exact=True, dedup_near_threshold=0.8)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        m = prepare_dataset(
            sources, part, tokenizer=tok, val_fraction=0.2, shard_tokens=1000, stages=stages, part=(i, 2), log=quiet
        )
        assert "dedup_exact" not in m.stages and (part / "dedup" / "store.json").is_file()
    merged = merge_datasets(parts, tmp_path / "merged")
    assert merged.stages["merge.dedup_exact"]["documents_dropped"] == 1
    assert merged.stages["merge.dedup_near"]["documents_dropped"] == 1
    assert sum(e.documents for e in merged.splits.values()) == 40
    assert sum(s.documents for s in merged.sources) == 40
    last = len(merged.files) - 1  # 3.jsonl, part 1's second file; lines 11 and 12 are the planted copies
    kept = {(f, o) for f, o in _origins(tmp_path / "merged", merged)}
    assert (last, 11) not in kept and (last, 12) not in kept and (last, 10) in kept
    rewritten = merged.removals[0].shards
    assert 1 <= len(rewritten) < sum(len(e.shards) for e in merged.splits.values())
    out = CliRunner().invoke(app, ["data", "verify", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    shown = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "merged")]).output
    assert "stage merge.dedup_exact: documents_dropped 1" in shown
    (parts[1] / "dedup" / "store.json").write_text('{"kept": 20}')  # what an older Keel wrote beside its tables
    old = run_keel("data", "merge", str(tmp_path / "again"), *map(str, parts), cwd=tmp_path)
    assert_one_line_error(old, "dedup keys of an older Keel; prepare this part again")
    assert not list(tmp_path.glob("*again*"))


def _origins(root: Path, manifest: Manifest) -> list[tuple[int, int]]:
    import numpy as np

    out = []
    for entry in manifest.splits.values():
        for shard in entry.shards:
            out += [tuple(map(int, row)) for row in np.load(root / shard.origins).reshape(-1, 2)]
    return out


def test_both_passes_and_dedup_say_how_far_they_got_with_rate_and_time_left(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.progress.EVERY_S", 0.0)  # a line after every span
    monkeypatch.setattr("keel.data.pool.TASK_CHARS", 2_000)  # many spans per file
    sources = _corpus(tmp_path / "raw", files=3, docs=40)
    rng = random.Random(5)
    (tmp_path / "raw" / "notes.txt").write_text(random_document(rng, 300))
    sources.append(str(tmp_path / "raw" / "*.txt"))
    total = sum(p.stat().st_size for p in (tmp_path / "raw").iterdir()) / 1e6
    lines: list[str] = []
    prepare_dataset(sources, tmp_path / "ds", vocab_size=400, stages=STAGES, shard_tokens=5_000, log=lines.append)
    for name in ("scan", "tokenize"):
        said = [line for line in lines if line.startswith(f"{name}: ")]
        done = [float(line.split(": ")[1].split(" of ")[0].replace(",", "")) for line in said]
        assert len(said) > 5 and done == sorted(done) and 0 < done[-1] <= total + 1e-6, said
        assert all(f" of {total:,.1f} MB (" in line and " MB/s, " in line and "left" in line for line in said)
    assert any(" documents read, " in line for line in lines) and any(" tokens written" in line for line in lines)
    # Deciding dedup after the scan says how far it got too: each sort phase in MB of keys, then the verdicts.
    for phase in ("dedup, exact: ", "dedup, near: band keys: ", "dedup, verdicts: "):
        said = [line for line in lines if line.startswith(phase)]
        assert said and "(100%)" in said[-1] and "left" in said[-1], (phase, lines)
    decided = next(line for line in lines if line.startswith("dedup: decided "))
    assert decided.endswith("near duplicates)") and " exact and " in decided


_SLOW_WORKERS = """
import time
import keel.data.pool as pool
assess = pool.assess
def slow(*args, **kwargs):
    time.sleep(0.003)  # every document: the scan lasts seconds, long enough to be stopped in the middle
    return assess(*args, **kwargs)
pool.assess = slow
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "Ctrl-C", "SIGKILL"]
)
def test_a_prepare_stopped_or_killed_leaves_no_worker_behind_and_runs_again(tmp_path, signum):
    sources = _corpus(tmp_path / "raw", files=6, docs=200)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SLOW_WORKERS)
    src = str(Path(__file__).parents[1] / "src")
    slow = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), src])}
    args = ["data", "prepare", "--source", sources[0], "--out", str(tmp_path / "out"), "--set", "prepare.workers=2"]
    args += ["--set", "prepare.vocab_size=400", "--set", "prepare.dedup_near_threshold=0.8"]
    proc = subprocess.Popen(  # a session of its own, as a terminal's
        [sys.executable, "-m", "keel", *args],
        cwd=tmp_path,
        env=slow,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline, workers = time.monotonic() + 60, []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        workers = [c for c in psutil.Process(proc.pid).children() if "--multiprocessing-fork" in c.cmdline()]
    time.sleep(0.5)  # the workers are at work
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground group, workers included
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)  # a worker left behind would hold the pipes open
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert len(gone) == 2 and not alive
    if signum != signal.SIGKILL:
        assert proc.returncode == 128 + signum and err.decode().strip() == f"keel: stopped by {signum.name}"
    assert not (tmp_path / "out").exists() and len(list(tmp_path.glob(".out.partial-*"))) == 1
    again = run_keel(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert load_manifest(tmp_path / "out").splits["train"].documents > 0


def test_partitions_hold_each_key_once_in_key_order_and_split_what_outgrows_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.partitions.BUFFER_BYTES", 1 << 12)  # many small runs appended to each file
    row = np.dtype([("k", "<u8"), ("seq", "<u4")])
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**64 - 1, 30_000, dtype=np.uint64)
    keys[:5000] = keys[5000]  # one key held 5,001 times: more than a budget's worth, it cannot be split
    keys[10_000:12_000] = keys[12_000:14_000]  # and pairs of equal keys
    keys[20_000:20_500] = (keys[20_000:20_500] >> np.uint64(8)) | (np.uint64(0xAB) << np.uint64(56))  # a crowded prefix
    records = np.zeros(len(keys), row)
    records["k"], records["seq"] = keys, np.arange(len(keys))
    parts = Partitions(tmp_path / "p", row)
    for lo in range(0, len(records), 700):
        parts.add(records[lo : lo + 700])
    budget = 2400  # 200 records
    seen: list[np.ndarray] = []
    for part in parts.each(budget):
        assert part.nbytes <= budget or len(np.unique(part["k"])) == 1
        seen.append(part)
    parts.delete()
    assert not (tmp_path / "p").exists()
    assert sorted(np.concatenate(seen)["seq"].tolist()) == list(range(len(keys)))
    holder = {}
    for i, part in enumerate(seen):
        for k in np.unique(part["k"]).tolist():
            assert holder.setdefault(k, i) == i  # all of a key's records in one partition
    assert [int(p["k"].min()) for p in seen] == sorted(int(p["k"].min()) for p in seen)  # in key order
    order, sizes = grouped(keys)
    assert sorted(order.tolist()) == list(range(len(keys)))
    groups = np.split(keys[order], np.cumsum(sizes)[:-1])
    assert all((g == g[0]).all() for g in groups) and len({int(g[0]) for g in groups}) == len(groups)


def test_the_tokenizer_sample_counts_only_documents_dedup_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.prepare.TRAIN_SAMPLE_CHARS", 10**9)  # every training document offers its text
    monkeypatch.setattr("keel.data.scan.TRAIN_SAMPLE_CHARS", 3000)  # and the sample stops at 6,000 characters
    rng = random.Random(4)
    distinct = [random_document(rng, 60) for _ in range(80)]
    # Copies of the first document come before anything else: more text than the cap, twice over.
    stream = [distinct[0]] * 40 + distinct
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in stream))
    seen: list[list[str]] = []
    train = keel.data.prepare.train_tokenizer

    def spy(sample: list[str], vocab_size: int):
        seen.append(list(sample))
        return train(sample, vocab_size)

    monkeypatch.setattr(keel.data.prepare, "train_tokenizer", spy)
    stages = StageSettings(dedup_exact=True, dedup_near_threshold=0.8)
    prepare_dataset([str(raw / "*.jsonl")], tmp_path / "ds", vocab_size=300, stages=stages, log=quiet)
    (sample,) = seen
    assert len(set(sample)) == len(sample)  # the copies were dropped before they could count
    assert sum(map(len, sample)) >= 6000  # the cap was reached with kept documents
    assert sample == [t for t in distinct if t in set(sample)]  # in document order


def test_more_documents_than_a_store_can_number_is_one_line_asking_for_parts(tmp_path, monkeypatch):
    monkeypatch.setattr("keel.data.dedup_store.MAX_DOCUMENTS", 10)  # 2**32 - 1 in truth: scan numbers are 32 bits
    sources = _corpus(tmp_path / "raw", files=1, docs=40)
    with pytest.raises(DataError, match=r"more than 10 documents in one store; prepare in --shard parts$"):
        prepare_dataset(sources, tmp_path / "out", vocab_size=300, stages=StageSettings(dedup_exact=True), log=quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))  # bad input: nothing kept
