"""`keel data remove` reaches everything: tombstones for later prepares, the manifest's file list, the vocabulary."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, dataset_text, quiet, run_keel
from keel.cli import app
from keel.data.dataset import TokenDataset
from keel.data.inspect import inspect_lines, verify_dataset
from keel.data.lineage import document_spans, find_documents
from keel.data.manifest import load_manifest, resolve_inside
from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings
from keel.data.tokenizer import load_tokenizer
from keel.data.tombstones import check_tombstones_file
from keel.errors import DataError

NAME = "Zorblax Quintavius"  # a person only document 5 of a.jsonl names
SETTINGS = {"vocab_size": 400, "val_fraction": 0.2, "shard_tokens": 3000, "log": quiet}


def write_corpus(directory: Path, first: str | None = None) -> Path:
    """a.jsonl (40 documents; line 5 names NAME many times, so the BPE learns it) and two text files."""
    rng = random.Random(2)
    words = [f"w{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    docs[4] = f"{NAME} " * 60 + docs[4]  # JSON Lines ordinals are line numbers: this is document 5
    if first is not None:
        docs[0] = first
    directory.mkdir(parents=True)
    (directory / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (directory / "b.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    (directory / "c.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    return directory


def text_of(dataset: Path) -> str:
    """Every document of a dataset, decoded with its own tokenizer (wherever the manifest keeps it)."""
    manifest = load_manifest(dataset)
    tok = load_tokenizer(resolve_inside(dataset, manifest.tokenizer.file))
    out = []
    for split in manifest.splits:
        data = TokenDataset(dataset, split)
        out.append(tok.decode(data.read(0, data.num_tokens).tolist()))
    return " ".join(out)


def remove(*args: str) -> str:
    result = CliRunner().invoke(app, ["data", "remove", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "src")


def test_a_removed_document_stays_out_of_later_prepares_even_moved_and_renamed(corpus, tmp_path):
    ds = tmp_path / "ds"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    output = remove(str(ds), "--source", "a.jsonl", "--ordinal", "5")
    assert "tombstones: 1 content hashes" in output
    [tombstone] = load_manifest(ds).tombstones
    assert (tombstone.key, tombstone.ordinal) == ("a.jsonl", 5)
    moved = tmp_path / "elsewhere"
    shutil.copytree(corpus, moved)
    (moved / "a.jsonl").rename(moved / "people.jsonl")
    # Without the tombstones the document comes back.
    prepare_dataset([str(moved / "*")], tmp_path / "control", **SETTINGS)
    assert NAME in dataset_text(tmp_path / "control")
    logged: list[str] = []
    again = prepare_dataset(
        [str(moved / "*")], tmp_path / "again", **{**SETTINGS, "log": logged.append}, tombstones=[str(ds)]
    )
    assert again.stages["tombstone"]["documents_dropped"] == 1
    assert any(line.startswith("tombstone: dropped 1 documents") and "people.jsonl:5" in line for line in logged)
    assert NAME not in dataset_text(tmp_path / "again")
    # The new dataset carries the tombstone on: a prepare given it drops the document too.
    assert [t.sha256 for t in again.tombstones] == [tombstone.sha256]
    third = prepare_dataset([str(moved / "*")], tmp_path / "third", **SETTINGS, tombstones=[str(tmp_path / "again")])
    assert third.stages["tombstone"]["documents_dropped"] == 1


def test_a_tombstones_file_outlives_the_dataset_and_prepare_reads_it_from_the_config(corpus, tmp_path):
    ds, dead = tmp_path / "ds", tmp_path / "registry" / "tombstones.json"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    with pytest.raises(DataError, match="already holds a dataset; choose another data.dataset or delete it"):
        prepare_dataset([str(corpus / "*")], ds, **SETTINGS)  # no tombstones yet: the plain refusal
    assert "holds 1" in remove(str(ds), "--source", "a.jsonl", "--ordinal", "5", "--tombstones", str(dead))
    assert "holds 2" in remove(str(ds), "--source", "b.txt", "--tombstones", str(dead))
    # Preparing over the dataset is refused, and the refusal says how to keep its removed documents out.
    with pytest.raises(
        DataError, match=rf'choose another data.dataset \(with prepare.tombstones = \["{ds}"\]: it keeps its 2'
    ):
        prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    shutil.rmtree(ds)
    out = tmp_path / "again"
    base = ["data", "prepare", "--source", str(corpus / "*"), "--set", "prepare.vocab_size=400"]
    result = run_keel(*base, "--out", str(out), "--set", f"prepare.tombstones=[{json.dumps(str(dead))}]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert load_manifest(out).stages["tombstone"]["documents_dropped"] == 2
    assert "tombstone: dropped 2 documents" in result.stderr + result.stdout
    missing = run_keel(*base, "--out", str(tmp_path / "x"), "--set", 'prepare.tombstones=["nope"]', cwd=tmp_path)
    assert_one_line_error(missing, "prepare.tombstones: nope is neither a prepared dataset nor a tombstones file")
    (tmp_path / "bad.json").write_text('{"tombstones": [{"sha256": 3}]}')
    with pytest.raises(DataError, match=r"prepare.tombstones: .*bad.json: tombstones.0"):
        prepare_dataset([str(corpus / "*")], tmp_path / "y", **SETTINGS, tombstones=[str(tmp_path / "bad.json")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_tombstones_file_that_cannot_be_written_is_refused_before_the_removal(corpus, tmp_path):
    ds = tmp_path / "ds"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    before = (ds / "manifest.json").read_bytes()
    (tmp_path / "notes.json").write_text("[1, 2]")
    remove = ("data", "remove", str(ds), "--source", "a.jsonl", "--ordinal", "5", "--tombstones")
    result = run_keel(*remove, str(tmp_path / "notes.json"), cwd=tmp_path)
    assert_one_line_error(result, "--tombstones: ", 'notes.json has no "tombstones" list')
    for bad, message in ((tmp_path, "is a directory; name a file"), (tmp_path / "notes.json" / "t.json", "is a file")):
        with pytest.raises(DataError, match=message):
            check_tombstones_file(bad)
    assert (ds / "manifest.json").read_bytes() == before  # nothing was removed


def test_removing_a_whole_file_marks_it_removed_in_the_file_list(corpus, tmp_path):
    ds = tmp_path / "ds"
    before = prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    output = remove(str(ds), "--source", "b.txt")
    assert "source files marked removed in the manifest: b.txt" in output
    after = load_manifest(ds)
    [entry] = [f for f in after.files if f.key == "b.txt"]
    assert entry.removed == after.removals[-1].time
    assert all(f.removed is None for f in after.files if f.key != "b.txt")
    assert after.stages["remove"]["documents_dropped"] == 1
    assert after.sources[0].documents == before.sources[0].documents - 1
    with pytest.raises(DataError, match=r"source file 'b.txt' was removed \(20"):
        find_documents(ds, "b.txt")
    assert f"file b.txt: removed {entry.removed}" in inspect_lines(ds)
    # One document of a file leaves the file listed as present.
    remove(str(ds), "--source", "a.jsonl", "--ordinal", "5")
    assert all(f.removed is None for f in load_manifest(ds).files if f.key == "a.jsonl")


def documents(dataset: Path, split: str) -> list[str]:
    """A split's documents, each decoded on its own (without its EOS)."""
    manifest = load_manifest(dataset)
    tok = load_tokenizer(resolve_inside(dataset, manifest.tokenizer.file))
    data = TokenDataset(dataset, split)
    return [
        tok.decode(data.read(d.start, d.end - d.start - 1).tolist()) for d in document_spans(dataset, manifest, split)
    ]


def test_remove_reports_the_vocabulary_learned_only_from_the_removed_text(corpus, tmp_path):
    # Kept text with English words: merge steps such as "ax" are inside kept words that encode to bigger entries
    # ("axle"), so the kept text never emits them, yet they were learned from it too and are not reported.
    rng = random.Random(5)
    english = "and hand sand send end band quint tavern axle".split()
    with (corpus / "a.jsonl").open("a") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(rng.choice(english) for _ in range(40))}) + "\n")
    ds = tmp_path / "ds"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    tokenizer = load_manifest(ds).tokenizer
    tok = load_tokenizer(ds / "tokenizer.json")
    assert "Zorblax" in tok.get_vocab() and "ĠQuintavius" in tok.get_vocab()
    [span] = find_documents(ds, "a.jsonl", 5)
    assert span.split == "train"  # so in the BPE's sample (the corpus is small: every training document is)
    removed = tok.decode(TokenDataset(ds, "train").read(span.start, span.end - span.start - 1).tolist())
    output = remove(str(ds), "--source", "a.jsonl", "--ordinal", "5")
    assert "tokenizer entries were learned only from the removed text" in output and "' Quintavius'" in output
    removal = load_manifest(ds).removals[-1]
    # The definition, computed here directly: a learned entry (2+ byte symbols) inside a word of the removed text
    # whose text occurs in no kept training document.
    kept = [d.encode() for d in documents(ds, "train")]
    words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(removed)]
    special = set(tok.get_added_tokens_decoder())
    expected = {
        i
        for t, i in tok.get_vocab().items()
        if len(t) > 1 and i not in special and any(t in w for w in words)
        if not any(tok.decode([i]).encode() in d for d in kept)
    }
    assert set(removal.vocabulary) == expected
    # Every piece of the name, and the merge steps no text emits (Zorbl, Quintav), but no step of a kept word.
    assert {i for t, i in tok.get_vocab().items() if "Zorb" in t or "Quint" in t} <= expected
    steps = {tok.token_to_id(t) for t in ("ax", "av", "tav", "nd")}  # in "axle", "tavern", "and"
    assert None not in steps and not steps & expected
    assert load_manifest(ds).tokenizer == tokenizer  # reported, not changed, without --retrain-tokenizer
    assert f"{len(removal.vocabulary)} vocabulary entries learned only from them" in "\n".join(inspect_lines(ds))


def test_nothing_is_reported_learned_from_text_the_tokenizer_never_trained_on(corpus, tmp_path):
    ds, given = tmp_path / "ds", tmp_path / "given"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    [val] = [d for d in document_spans(ds, load_manifest(ds), "val")][:1]
    key = load_manifest(ds).files[val.file].key
    output = remove(str(ds), "--source", key, "--ordinal", str(val.ordinal))
    assert "no tokenizer entry was learned only from the removed text (the removed text was not in the sample" in output
    prepare_dataset([str(corpus / "*")], given, **SETTINGS, tokenizer=str(ds / "tokenizer.json"))
    assert load_manifest(given).tokenizer.given
    before = (given / "manifest.json").read_bytes()
    refused = run_keel(
        "data", "remove", str(given), "--source", "a.jsonl", "--ordinal", "5", "--retrain-tokenizer", cwd=tmp_path
    )
    assert_one_line_error(refused, "--retrain-tokenizer: nothing in", "given by prepare.tokenizer", "remove without")
    assert (given / "manifest.json").read_bytes() == before  # refused before anything changed
    output = remove(str(given), "--source", "a.jsonl", "--ordinal", "5")
    assert "(the tokenizer was given by prepare.tokenizer, not trained on this dataset)" in output
    assert load_manifest(given).removals[-1].vocabulary == []


def test_retrain_tokenizer_writes_what_a_fresh_prepare_without_the_document_writes(corpus, tmp_path):
    ds = tmp_path / "ds"
    prepare_dataset([str(corpus / "*")], ds, **SETTINGS)
    (ds / "t1").mkdir()
    (ds / "t1" / "junk.bin").write_bytes(b"left by a crashed attempt, never committed")
    plain = tmp_path / "plain"  # the same removal without re-encoding: the text must come out the same
    shutil.copytree(ds, plain)
    remove(str(plain), "--source", "a.jsonl", "--ordinal", "5")
    output = remove(str(ds), "--source", "a.jsonl", "--ordinal", "5", "--retrain-tokenizer")
    assert "re-encoded every shard" in output and "are gone" in output and "resume refuses" in output
    fresh = prepare_dataset([str(corpus / "*")], tmp_path / "fresh", **SETTINGS, tombstones=[str(ds)])
    new = load_manifest(ds)
    assert new.tokenizer.file == "t1/tokenizer.json" and new.tokenizer.sha256 == fresh.tokenizer.sha256
    for split in ("train", "val"):
        assert [s.sha256 for s in new.splits[split].shards] == [s.sha256 for s in fresh.splits[split].shards]
    assert new.removals[-1].retokenized and verify_dataset(ds)[1]
    vocab = load_tokenizer(ds / "t1" / "tokenizer.json").get_vocab()
    assert not [t for t in vocab if "Zorb" in t or "Quint" in t]
    assert text_of(ds) == text_of(plain) and NAME not in text_of(ds)
    # Only what the new manifest names is left: the old shards and tokenizer are gone, and so is the junk.
    named = {n for e in new.splits.values() for s in e.shards for n in (s.file, s.index, s.origins)}
    named.add(new.tokenizer.file)
    assert {p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file()} == named | {"manifest.json"}
    # A second removal rewrites shards of the new version as usual.
    remove(str(ds), "--source", "c.txt")
    assert verify_dataset(ds)[1] and load_manifest(ds).splits != new.splits


def test_with_pii_scrubbed_the_tombstone_hashes_the_source_text(tmp_path):
    mail = "zorblax.quintavius@example.com"
    corpus = write_corpus(tmp_path / "src", first=f"write to {mail} about w1 w2 w3")
    settings = {**SETTINGS, "stages": StageSettings(pii=True)}
    ds, copy = tmp_path / "ds", tmp_path / "copy"
    prepare_dataset([str(corpus / "*")], ds, **settings)
    assert mail not in dataset_text(ds)
    shutil.copytree(ds, copy)
    assert "its source is gone" not in remove(str(ds), "--source", "a.jsonl", "--ordinal", "1")
    again = prepare_dataset([str(corpus / "*")], tmp_path / "again", **settings, tombstones=[str(ds)])
    assert again.stages["tombstone"]["documents_dropped"] == 1
    # With the source gone, the scrubbed text is all there is to hash, and the removal says so.
    (corpus / "a.jsonl").unlink()
    assert "tombstone of a.jsonl:1: its source is gone or changed" in remove(
        str(copy), "--source", "a.jsonl", "--ordinal", "1"
    )
