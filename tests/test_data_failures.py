"""Bad input files and filesystem failures of prepare, merge and remove: one line naming the path, exit 2."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import assert_one_line_error, random_document, read_only, run_keel
from keel.data.manifest import load_manifest

VOCAB = "prepare.vocab_size=300"


def _docs(seed: int, n: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [random_document(rng, 40) for _ in range(n)]


def _jsonl(docs: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


def _parquet(docs: list[str]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": docs}), sink)
    return sink.getvalue().to_pybytes()


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    """The data with 64 bytes in its middle overwritten."""
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0x5A for b in data[middle : middle + 64]) + data[middle + 64 :]


# name -> (a cut copy of a good file, the kind it is counted as under prepare.bad_input = "skip")
CUT = {
    "web.jsonl.gz": (lambda: _cut(gzip.compress(_jsonl(_docs(1)), mtime=0)), "truncated_file"),
    "web.jsonl.zst": (lambda: _cut(zstandard.ZstdCompressor().compress(_jsonl(_docs(2)))), "truncated_file"),
    "code.parquet": (lambda: _cut(_parquet(_docs(3))), "unreadable_parquet"),
    "web.jsonl": (lambda: _cut(_jsonl(_docs(4))), "invalid_json"),
    "book.txt": (lambda: "café ".encode() * 50 + "é".encode()[:1], "invalid_utf8"),
}
CORRUPT = {
    "web.jsonl.gz": lambda: _flip(gzip.compress(_jsonl(_docs(5)), mtime=0)),
    "web.jsonl.zst": lambda: _flip(zstandard.ZstdCompressor(write_checksum=True).compress(_jsonl(_docs(6)))),
    "code.parquet": lambda: _flip(_parquet(_docs(7))),
}


def _raw(tmp_path: Path, files: dict[str, bytes]) -> str:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.jsonl").write_text(_jsonl(_docs(0)).decode())
    for name, data in files.items():
        (raw / name).write_bytes(data)
    return str(raw / "*")


def _nothing_written(tmp_path: Path) -> bool:
    return not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.partial-*"))


@pytest.mark.parametrize("name", list(CUT))
def test_a_cut_file_of_every_format_is_an_error_naming_it(tmp_path, name):
    sources = _raw(tmp_path, {name: CUT[name][0]()})
    result = run_keel(
        "data", "prepare", "--source", sources, "--out", str(tmp_path / "ds"), "--set", VOCAB, cwd=tmp_path
    )
    assert_one_line_error(result, name)
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("name", list(CORRUPT))
def test_a_corrupt_middle_of_a_compressed_file_is_an_error_naming_it(tmp_path, name):
    sources = _raw(tmp_path, {name: CORRUPT[name]()})
    result = run_keel(
        "data", "prepare", "--source", sources, "--out", str(tmp_path / "ds"), "--set", VOCAB, cwd=tmp_path
    )
    assert_one_line_error(result, name, "corrupt")
    assert _nothing_written(tmp_path)


def test_with_bad_input_skip_every_cut_or_corrupt_file_is_counted_in_the_manifest_and_inspect(tmp_path):
    files = {name: make() for name, (make, _) in CUT.items()}
    files |= {f"corrupt.{name}": make() for name, make in CORRUPT.items()}
    sources = _raw(tmp_path, files)
    args = ["--source", sources, "--out", str(tmp_path / "ds"), "--set", VOCAB, "--set", 'prepare.bad_input="skip"']
    result = run_keel("data", "prepare", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    skipped = load_manifest(tmp_path / "ds").skipped
    assert skipped == {
        "truncated_file": 2,
        "unreadable_parquet": 1,
        "invalid_json": 1,
        "invalid_utf8": 1,
        "corrupt_compression": 2,
        "corrupt_parquet": 1,
    }
    shown = run_keel("data", "inspect", str(tmp_path / "ds"), cwd=tmp_path).stdout
    assert "skipped truncated_file: 2" in shown and "skipped corrupt_parquet: 1" in shown


def test_an_unreadable_source_is_an_error_naming_it_or_a_counted_skip(tmp_path):
    sources = _raw(tmp_path, {})
    # Reading /proc/self/mem at offset 0 fails with EIO, for root as for anyone: a file that cannot be read.
    (tmp_path / "raw" / "broken.txt").symlink_to("/proc/self/mem")
    out = ["--out", str(tmp_path / "ds"), "--set", VOCAB]
    result = run_keel("data", "prepare", "--source", sources, *out, cwd=tmp_path)
    assert_one_line_error(result, "broken.txt: cannot read this source (Input/output error)")
    assert _nothing_written(tmp_path)
    skip = run_keel("data", "prepare", "--source", sources, *out, "--set", 'prepare.bad_input="skip"', cwd=tmp_path)
    assert skip.returncode == 0, skip.stderr
    assert load_manifest(tmp_path / "ds").skipped == {"unreadable_file": 1}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_source_without_read_permission_is_refused_before_any_work(tmp_path):
    sources = _raw(tmp_path, {"secret.txt": b"no one may read this"})
    (tmp_path / "raw" / "secret.txt").chmod(0)
    result = run_keel(
        "data", "prepare", "--source", sources, "--out", str(tmp_path / "ds"), "--set", VOCAB, cwd=tmp_path
    )
    assert_one_line_error(result, "secret.txt: cannot read this source (permission denied)")
    assert _nothing_written(tmp_path)


def test_out_under_a_regular_file_is_refused_before_the_sources_are_read(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    # The sources match nothing, an error of its own: the output location is checked first.
    args = ["--source", str(tmp_path / "nothing/*.txt"), "--out", str(tmp_path / "afile" / "ds")]
    result = run_keel("data", "prepare", *args, cwd=tmp_path)
    assert_one_line_error(result, f"{tmp_path / 'afile'} is a file, not a directory")
    merged = run_keel("data", "merge", str(tmp_path / "afile" / "m"), str(tmp_path / "nowhere"), cwd=tmp_path)
    assert_one_line_error(merged, f"{tmp_path / 'afile'} is a file, not a directory")


def test_a_read_only_location_is_refused_before_anything_is_created(tmp_path):
    sources = _raw(tmp_path, {})
    (tmp_path / "ro").mkdir()
    with read_only(tmp_path / "ro"):
        for out in (tmp_path / "ro" / "ds", tmp_path / "ro" / "sub" / "ds"):
            result = run_keel("data", "prepare", "--source", sources, "--out", str(out), "--set", VOCAB, cwd=tmp_path)
            assert_one_line_error(result, str(out), f"{tmp_path / 'ro'} is ")
        assert not list((tmp_path / "ro").iterdir())


def test_merge_and_remove_on_a_read_only_location_are_one_line_and_change_nothing(tmp_path):
    sources = _raw(tmp_path, {})
    (tmp_path / "ro").mkdir()
    ds = tmp_path / "ro" / "ds"
    assert (
        run_keel("data", "prepare", "--source", sources, "--out", str(ds), "--set", VOCAB, cwd=tmp_path).returncode == 0
    )
    before = (ds / "manifest.json").read_bytes()
    with read_only(tmp_path / "ro"):
        removed = run_keel("data", "remove", str(ds), "--source", "good.jsonl", "--ordinal", "3", cwd=tmp_path)
        assert_one_line_error(removed, f"dataset {ds}: {ds} is ")
        merged = run_keel("data", "merge", str(tmp_path / "ro" / "m"), str(ds), cwd=tmp_path)
        assert_one_line_error(merged, str(tmp_path / "ro" / "m"))
    assert (ds / "manifest.json").read_bytes() == before and sorted(p.name for p in (tmp_path / "ro").iterdir()) == [
        "ds"
    ]


DEDUP_ON = ["--set", "prepare.dedup_exact=true", "--set", "prepare.dedup_near_threshold=0.8"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
@pytest.mark.parametrize("dedup", [[], DEDUP_ON], ids=["stages-off", "dedup-keys"])  # dedup: SIGBUS with hash tables
def test_a_full_disk_mid_prepare_is_one_line_and_keeps_the_work_to_resume(tmp_path, dedup):
    rng = random.Random(9)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "big.jsonl").write_text(_jsonl([random_document(rng, 200) for _ in range(800)]).decode())
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        out = ["--out", str(small / "ds"), "--set", VOCAB, "--set", "prepare.shard_tokens=20000", *dedup]
        result = run_keel("data", "prepare", "--source", str(raw / "*.jsonl"), *out, cwd=tmp_path)
        assert_one_line_error(result, str(small), "cannot prepare the dataset (no space left on device)")
        assert not (small / "ds").exists() and len(list(small.glob(".ds.partial-*"))) == 1
    finally:
        subprocess.run(["umount", str(small)], check=True)
