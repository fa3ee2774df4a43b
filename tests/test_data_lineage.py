"""Lineage and removal: find a document's shards and samples; remove it by rewriting only those shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error, dataset_text, run_keel
from keel.cli import app
from keel.data.inspect import verify_dataset
from keel.data.lineage import find_documents, remove_documents, sample_ids, shards_of
from keel.data.manifest import load_manifest
from keel.data.prepare import prepare_dataset
from keel.errors import ConfigError, DataError, KeelError


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    rng = random.Random(2)
    words = [f"w{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    docs[17] = "zebra " * 30 + docs[17]  # a marker only this document holds
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "ds"
    prepare_dataset(
        [str(tmp_path / "a.jsonl")], out, vocab_size=300, val_fraction=0.05, shard_tokens=300, log=lambda m: None
    )
    return out


def test_lineage_names_the_shards_and_samples_holding_a_document(dataset, tmp_path):
    [span] = find_documents(dataset, str(tmp_path / "a.jsonl"), ordinal=18)  # line 18 holds docs[17]
    manifest = load_manifest(dataset)
    shards = shards_of(manifest, span)
    assert shards and all(s.startswith(f"{span.split}/") for s in shards)
    ids = sample_ids(span, 32)
    assert ids.start * 32 < span.end and (ids.stop - 1) * 32 + 33 > span.start
    out = CliRunner().invoke(app, ["data", "lineage", str(dataset), "--source", "a.jsonl", "--ordinal", "18"])
    assert out.exit_code == 0 and shards[0] in out.output


def test_remove_rewrites_only_the_shards_that_held_the_document(dataset, tmp_path):
    before = load_manifest(dataset)
    assert "zebra" in dataset_text(dataset)
    [span] = find_documents(dataset, "a.jsonl", ordinal=18)
    changed = remove_documents(dataset, [span])
    after = load_manifest(dataset)
    assert "zebra" not in dataset_text(dataset)
    assert verify_dataset(dataset)[1]
    for split in before.splits:
        for old, new in zip(before.splits[split].shards, after.splits[split].shards, strict=True):
            assert (old.sha256 == new.sha256) == (old.file not in changed)
    assert after.splits[span.split].documents == before.splits[span.split].documents - 1
    assert after.removals[0].documents == [("a.jsonl", 18)]
    with pytest.raises(DataError, match=r"document 18 of 'a.jsonl' was removed \(20"):
        find_documents(dataset, "a.jsonl", ordinal=18)
    shown = CliRunner().invoke(app, ["data", "inspect", str(dataset)])
    assert "removal " in shown.output and "1 documents" in shown.output
    # Superseded shard files are gone; only what the manifest names is left.
    named = {name for e in after.splits.values() for s in e.shards for name in (s.file, s.index, s.origins)}
    assert {p.relative_to(dataset).as_posix() for p in dataset.glob("*/*")} == named


def test_removing_an_unknown_source_is_an_error(dataset):
    with pytest.raises(DataError, match="no source file 'nope.jsonl' in the manifest"):
        find_documents(dataset, "nope.jsonl")


def test_lineage_of_a_document_that_is_not_there_is_one_line_naming_file_and_ordinal(dataset, tmp_path):
    result = run_keel("data", "lineage", str(dataset), "--source", "a.jsonl", "--ordinal", "99", cwd=tmp_path)
    assert_one_line_error(result, str(dataset), "no document 99 of 'a.jsonl'")
    remove_documents(dataset, find_documents(dataset, "a.jsonl"))
    result = run_keel("data", "lineage", str(dataset), "--source", "a.jsonl", cwd=tmp_path)
    assert_one_line_error(result, "'a.jsonl' has no documents left")


def test_parts_prepared_with_shard_i_of_n_merge_into_the_whole(tmp_path):
    rng = random.Random(4)
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(6):
        (raw / f"{i}.txt").write_text(" ".join(f"v{rng.randint(0, 99)}" for _ in range(80)))
    sources = [str(raw / "*.txt")]
    whole = prepare_dataset(sources, tmp_path / "whole", vocab_size=300, val_fraction=0.2, log=lambda m: None)
    tok = str(tmp_path / "whole" / "tokenizer.json")
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, part in enumerate(parts):
        prepare_dataset(sources, part, tokenizer=tok, val_fraction=0.2, part=(i, 2), log=lambda m: None)
    runner = CliRunner()
    out = runner.invoke(app, ["data", "merge", str(tmp_path / "merged"), *map(str, parts)])
    assert out.exit_code == 0, out.output
    merged = load_manifest(tmp_path / "merged")
    # Each part holds out at least one validation document, so only the totals must agree.
    for key in ("documents", "tokens"):
        assert sum(getattr(e, key) for e in merged.splits.values()) == sum(
            getattr(e, key) for e in whole.splits.values()
        )
    assert verify_dataset(tmp_path / "merged")[1]
    assert len(find_documents(tmp_path / "merged", "5.txt")) == 1


def test_shard_without_a_given_tokenizer_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("a b c")
    with pytest.raises(ConfigError, match="--shard needs prepare.tokenizer"):
        prepare_dataset([str(tmp_path / "*.txt")], tmp_path / "ds", part=(0, 2), log=lambda m: None)


def test_malformed_shard_option_names_the_expected_form(tmp_path):
    (tmp_path / "a.txt").write_text("a b c")
    args = ["data", "prepare", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds"), "--shard", "1of2"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, KeelError) and "expected 'i/N', e.g. --shard 0/4" in str(result.exception)
