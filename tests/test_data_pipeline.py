"""keel.data sources, stages and checks: gz/zst/Parquet, licenses, filters, dedup, PII, inspect/verify, bad input."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from conftest import dataset_text, dedup_verdicts, near_copy, quiet, random_document
from keel.cli import app
from keel.data.dedup_store import DedupStore, Keys
from keel.data.inspect import verify_dataset
from keel.data.minhash import MinHasher, lsh_bands
from keel.data.pii import scrub
from keel.data.pii_rules import luhn_ok
from keel.data.prepare import prepare_dataset
from keel.data.stages import Pipeline, StageSettings, assess, clean, quality_failure
from keel.errors import ConfigError, DataError

PII_DOC = "contact jane.doe@example.org or +1 415-555-0132, card 4111 1111 1111 1111, host 10.0.0.7 and 2001:db8::7334"
STAGES = StageSettings(
    normalize="NFC", min_words=5, max_repeated_line_fraction=0.5, dedup_exact=True, dedup_near_threshold=0.8, pii=True
)


def _write_mixed(root: Path) -> dict[str, list[str]]:
    """A .jsonl.gz, a .jsonl.zst and a .parquet with planted exact and near duplicates and PII."""
    rng = random.Random(1)
    base = [random_document(rng) for _ in range(30)]
    web = base[:10] + [base[0], near_copy(base[1]), PII_DOC + " " + random_document(rng, 20)]
    books = base[10:20] + [base[2]]  # an exact duplicate across sources
    code = base[20:30] + [near_copy(base[21]), "too short", "x\nx\nx\nx\nx\nx and some more words here"]
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "web.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in web))
    data = "".join(json.dumps({"body": t}) + "\n" for t in books).encode()
    (root / "books.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    pq.write_table(pa.table({"text": code}), root / "code.parquet")
    return {"web": web, "books": books, "code": code}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mixed")
    _write_mixed(root / "raw")
    # books use another text field; a second prepare call is not needed: the zst file's field is "body".
    (root / "raw" / "books.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(
            zstandard.ZstdDecompressor()
            .decompress((root / "raw" / "books.jsonl.zst").read_bytes())
            .replace(b'"body"', b'"text"')
        )
    )
    sources = [str(root / "raw/*.jsonl.gz"), str(root / "raw/*.jsonl.zst"), str(root / "raw/*.parquet")]
    licenses = {sources[0]: "CC-BY-4.0", sources[2]: "MIT"}
    manifest = prepare_dataset(
        sources,
        root / "ds",
        vocab_size=300,
        val_fraction=0.2,
        shard_tokens=2000,
        licenses=licenses,
        stages=STAGES,
        log=quiet,
    )
    return root / "ds", manifest


def test_mixed_formats_drop_planted_duplicates_and_count_every_stage(mixed):
    _, manifest = mixed
    stages = manifest.stages
    assert stages["dedup_exact"]["documents_dropped"] == 2
    assert stages["dedup_near"]["documents_dropped"] == 2
    assert stages["filter.min_words"]["documents_dropped"] == 1
    assert stages["filter.max_repeated_line_fraction"]["documents_dropped"] == 1
    assert stages["pii"]["documents_changed"] == 1 and stages["pii"]["replacements"] == 5
    per_label = {k: v for k, v in stages["pii"].items() if k.startswith("replacements.")}
    assert per_label == {
        "replacements.EMAIL": 1,
        "replacements.CREDIT_CARD": 1,
        "replacements.IP_ADDRESS": 2,
        "replacements.PHONE_NUMBER": 1,
    }
    assert all(v > 0 for e in stages.values() for k, v in e.items() if k.startswith("bytes_"))
    assert manifest.splits["train"].documents + manifest.splits["val"].documents == 30 + 1
    assert [s.license for s in manifest.sources] == ["CC-BY-4.0", "unknown", "MIT"]


def test_pii_is_replaced_by_typed_placeholders_in_the_shards(mixed):
    text = dataset_text(mixed[0])
    for secret in ("jane.doe@example.org", "415-555-0132", "4111 1111 1111 1111", "10.0.0.7", "2001:db8::7334"):
        assert secret not in text
    for placeholder in ("<EMAIL>", "<PHONE_NUMBER>", "<CREDIT_CARD>", "<IP_ADDRESS>"):
        assert placeholder in text


def test_verify_passes_then_names_a_corrupted_shard(mixed, tmp_path):
    import shutil

    ds = tmp_path / "copy"
    shutil.copytree(mixed[0], ds)
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "verify", str(ds)])
    assert ok.exit_code == 0 and "ok:" in ok.output
    shard = ds / mixed[1].splits["train"].shards[0].file
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["data", "verify", str(ds)])
    assert bad.exit_code == 2 and "CORRUPT train/00000.bin" in bad.output
    shard.write_bytes(bytes(raw[:-2]))  # truncated: the size check names it
    with pytest.raises(DataError, match="train shard train/00000.bin has 3998 bytes, expected 4000"):
        verify_dataset(ds)


def test_inspect_shows_licenses_and_stage_counts(mixed):
    out = CliRunner().invoke(app, ["data", "inspect", str(mixed[0])])
    assert out.exit_code == 0
    assert "license CC-BY-4.0" in out.output and "stage dedup_near: bytes_dropped" in out.output


def test_luhn_decides_which_digit_runs_are_cards():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert scrub("pay 4111-1111-1111-1112 now") == ("pay 4111-1111-1111-1112 now", {})
    assert scrub("pay 5500 0000 0000 0004 now") == ("pay <CREDIT_CARD> now", {"CREDIT_CARD": 1})


def test_scrub_leaves_code_versions_and_dates_alone():
    text = "std::vector a::b at 12:30:45, version 1.2.3.4.5, on 2024-05-06, pi 3.14159"
    assert scrub(text) == (text, {})


def test_near_dedup_catches_small_edits_but_not_different_documents(tmp_path):
    rng = random.Random(3)
    docs = [random_document(rng, 300) for _ in range(40)]
    hasher, store = MinHasher(0.8), DedupStore(tmp_path / "d", exact=False, near_threshold=0.8)

    def keys(file: int, ordinal: int, text: str) -> Keys:
        return Keys(file, ordinal, None, hasher.band_hashes(hasher.signature(text)))

    batches = [[keys(0, i, d) for i, d in enumerate(docs)], [keys(1, 0, near_copy(docs[7]))]]
    assert dedup_verdicts(store, batches) == [None] * 40 + ["dedup_near"]
    assert lsh_bands(128, 0.8)[0] * lsh_bands(128, 0.8)[1] <= 128


def test_quality_filters_name_the_failing_filter():
    s = StageSettings(max_symbol_ratio=0.3, max_digit_ratio=0.3, max_top_ngram_fraction=0.3)
    assert quality_failure("{}[]<>;;;; a", s) == "max_symbol_ratio"
    assert quality_failure("12345 67890 a", s) == "max_digit_ratio"
    assert quality_failure("buy it now " * 20, s) == "max_top_ngram_fraction"
    assert quality_failure("an ordinary sentence about nothing in particular", s) is None


def test_normalization_is_counted_as_a_change():
    s = StageSettings(normalize="NFC")
    p, v = Pipeline(s), assess("cafe\u0301", s, None)
    assert p.accept([(0, 0, v)]) == [True] and clean("cafe\u0301", s)[0] == "caf\u00e9"
    assert p.stats["normalize"] == {"documents_changed": 1, "bytes_changed": 6}


def _bad_corpus(root: Path) -> list[str]:
    rng = random.Random(5)
    root.mkdir()
    lines = [json.dumps({"text": random_document(rng, 30)}) for _ in range(6)]
    lines[2] = '{"text": "unterminated'
    lines[4] = json.dumps({"other": "x"})
    (root / "a.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return [str(root / "*.jsonl.gz")]


def test_malformed_line_names_file_and_line_and_leaves_nothing(tmp_path):
    sources = _bad_corpus(tmp_path / "raw")
    with pytest.raises(DataError, match=r"a\.jsonl\.gz:3: not valid JSON"):
        prepare_dataset(sources, tmp_path / "ds", vocab_size=300, log=quiet)
    assert not (tmp_path / "ds").exists()


def test_skip_mode_counts_bad_records_by_kind(tmp_path):
    sources = _bad_corpus(tmp_path / "raw")
    manifest = prepare_dataset(sources, tmp_path / "ds", vocab_size=300, val_fraction=0.3, bad_input="skip", log=quiet)
    assert manifest.skipped == {"invalid_json": 1, "missing_field": 1}
    assert manifest.splits["train"].documents + manifest.splits["val"].documents == 4


def test_parquet_without_the_text_column_is_an_error_naming_the_file(tmp_path):
    pq.write_table(pa.table({"body": ["a b c", "d e f"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: no column 'text' \(has: body\); set prepare.text_field"):
        prepare_dataset([str(tmp_path / "*.parquet")], tmp_path / "ds", vocab_size=300, log=quiet)


def test_license_for_an_unknown_glob_is_a_config_error(tmp_path):
    pq.write_table(pa.table({"text": ["a b c", "d e f"]}), tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match="prepare.licenses: 'nope/\\*' is not one of prepare.sources"):
        prepare_dataset([str(tmp_path / "*.parquet")], tmp_path / "ds", licenses={"nope/*": "MIT"}, log=quiet)


def test_corpus_emptied_by_the_stages_says_how_many_were_dropped(tmp_path):
    pq.write_table(pa.table({"text": ["same text here", "same text here"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"empty corpus; 2 documents were dropped"):
        prepare_dataset([str(tmp_path / "*.parquet")], tmp_path / "ds", stages=StageSettings(min_words=10), log=quiet)
