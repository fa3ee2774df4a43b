"""PII scrubbing: the labelled set's per-label targets, exactness of the hint-and-run search, look-alikes, settings."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

import keel.data.pii_ner
from conftest import dataset_text
from keel.config_prepare import PrepareConfig
from keel.data.manifest import PrepareSettings
from keel.data.pii import detectors, find, replace, scrub
from keel.data.pii_phone import REGIONS
from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings
from keel.errors import ConfigError
from pii_labelled import PATH, build, evaluate

LABELS = {"EMAIL", "PHONE_NUMBER", "IP_ADDRESS", "CREDIT_CARD", "IBAN", "US_SSN", "SECRET"}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [json.loads(line) for line in PATH.read_text(encoding="utf-8").splitlines()]


def test_the_labelled_set_is_what_its_generator_writes(records):
    assert records == build()


def test_the_labelled_set_covers_every_label_and_context_with_hard_negatives(records):
    spans = Counter(s[2] for r in records for s in r["spans"])
    assert set(spans) == LABELS and min(spans.values()) >= 100, spans
    assert {r["context"] for r in records} == {"prose", "log", "code", "table", "chat", "multilingual"}
    assert sum(not r["spans"] for r in records) >= 300


def test_every_label_meets_recall_099_and_character_precision_095(records):
    figures = evaluate(records, find)
    assert set(figures) == LABELS, set(figures) - LABELS  # no label predicted that the set does not hold
    for label, f in figures.items():
        assert f["recall"] >= 0.99 and f["precision"] >= 0.95, (label, f)


def test_find_names_exactly_what_scrub_replaces(records):
    for r in records:
        assert replace(r["text"], find(r["text"])) == scrub(r["text"])[0], r["text"]


def _whole_text(text: str) -> tuple[str, Counter]:
    """The definition: every detector's regex and judge over the whole text, in order."""
    counts: Counter = Counter()
    for d in detectors(REGIONS):
        spans = [span for m in d.pattern.finditer(text) for span in d.judge(m)]
        counts.update({d.label: len(spans)} if spans else {})
        text = replace(text, [(s, e, d.label) for s, e in spans])
    return text, counts


def test_scrub_near_hints_finds_exactly_what_the_whole_text_regexes_find(records):
    rng = random.Random(5)
    alphabet = "0123456789 -.:+()@abcdefAFxKIz_%٣１\n[]{}/'\"=ATDOtE日"
    pieces = ["4111 1111 1111 1111", "AKIA", "eyJ", " [at] ", " dot ", "DE89", "://a:b@", "password='", "::"]
    for _ in range(20000):
        parts = [rng.choice(alphabet) if rng.random() < 0.9 else rng.choice(pieces) for _ in range(rng.randint(0, 40))]
        text = "".join(parts)
        assert scrub(text) == _whole_text(text), repr(text)
    for r in records:
        assert scrub(r["text"]) == _whole_text(r["text"])


@pytest.mark.parametrize(
    "text",
    [
        "pip install torch==2.3.0.1 and Chrome/120.0.6099.109, v1.2.3.4",
        "OID 2.5.4.3 and 1.3.6.1.4.1.311.21.8",
        "evens = xs[1::2]; odds = xs[::2]; std::vector<int> v; a::b::c(d);",
        "sha1 e3b0c44298fc1c149afbf4c8996fb92427ae41e4, id 123e4567-e89b-12d3-a456-426614174000",
        "on 2024-05-06 at 12:30:45, 06/05/2024, 1997-2003",
        "| 2023 | 144 238 144 | 255 250 250 |",
        "SKU 4155550132, Order #415-555-0132, tracking 1Z999AA10123456784",
        "IMEI 352099001761481, EAN 4006381333931, 9400 1000 0000 0000 0000 00",
        "git@github.com:keel/keel.git and icon@2x.png and look at example.com",
        "token = os.environ['TOKEN']; password = '********'; url = 'postgres://u:${PASSWORD}@db'",
    ],
)
def test_look_alikes_in_code_and_tables_are_left_alone(text):
    assert scrub(text) == (text, {})


def test_phone_numbers_without_a_country_code_follow_the_region_list():
    text = "Ruf an: 030 1234567"
    assert scrub(text, regions=("DE",))[0] == "Ruf an: <PHONE_NUMBER>"
    assert scrub(text, regions=("US",))[0] == text
    assert scrub("call +49 30 1234567", regions=("US",))[0] == "call <PHONE_NUMBER>"  # its own country code


def test_one_block_of_digits_is_a_phone_only_after_a_phone_word():
    assert scrub("call 4155550132 now")[0] == "call <PHONE_NUMBER> now"
    assert scrub("batch 4155550132 now")[0] == "batch 4155550132 now"
    assert scrub("电话4155550132")[0] == "电话<PHONE_NUMBER>"


def test_prepare_keys_unknown_regions_and_ner_without_pii_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown phone region 'XX'"):
        PrepareConfig(pii_regions=["US", "XX"])
    with pytest.raises(ValueError, match="pii_ner: scrubs names only with prepare.pii = true"):
        PrepareConfig(pii_ner=True)


def test_pii_settings_reach_the_manifest_only_when_pii_is_on():
    off = StageSettings.from_config(PrepareConfig())
    assert off.pii_regions is None and off.pii_ner is None  # a dataset without PII scrubbing: the manifest as before
    dumped = PrepareSettings(val_fraction=0.1, text_field="t", shard_tokens=9, stages=off).model_dump(exclude_none=True)
    assert "pii_regions" not in dumped["stages"] and "pii_ner" not in dumped["stages"]
    on = StageSettings.from_config(PrepareConfig(pii=True, pii_regions=["GB"]))
    assert on.pii_regions == ("GB",) and on.scrubbing == {"regions": ("GB",), "ner": None}
    ner = StageSettings.from_config(PrepareConfig(pii=True, pii_ner=True))
    assert ner.scrubbing["ner"] == ner.pii_ner_model == "en_core_web_sm"  # the default pipeline, named in the manifest


def test_ner_without_its_spacy_pipeline_is_a_one_line_error_before_any_work(tmp_path):
    (tmp_path / "a.txt").write_text("Jane Doe lives at 12 Abbey Road, London.")
    (tmp_path / "empty").mkdir()
    for model in ("no_such_spacy_model", str(tmp_path / "empty")):
        stages = StageSettings(pii=True, pii_ner=True, pii_ner_model=model)
        with pytest.raises(ConfigError, match=f"^prepare.pii_ner_model: cannot load the spaCy pipeline {model} "):
            prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "ds", stages=stages)
        assert not (tmp_path / "ds").exists()
    spacy = pytest.importorskip("spacy")
    spacy.blank("en").to_disk(tmp_path / "blank")  # loads, but nothing in it finds entities
    stages = StageSettings(pii=True, pii_ner=True, pii_ner_model=str(tmp_path / "blank"))
    with pytest.raises(ConfigError, match="^prepare.pii_ner_model: the spaCy pipeline .* finds no entities"):
        prepare_dataset([str(tmp_path / "a.txt")], tmp_path / "ds", stages=stages)
    assert not (tmp_path / "ds").exists()


def ruler_pipeline(directory: Path) -> Path:
    """A real spaCy pipeline whose entities come from patterns (no statistical model ships in a registry here)."""
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    people = [("Jane", "Doe"), ("Arjun", "Mehta"), ("Marie", "Curie")]
    patterns = [{"label": "PERSON", "pattern": [{"TEXT": first}, {"TEXT": last}]} for first, last in people]
    patterns.append({"label": "FAC", "pattern": [{"LIKE_NUM": True}, {"TEXT": "Rue"}, {"IS_TITLE": True}]})
    ruler.add_patterns(patterns)
    nlp.to_disk(directory)
    return directory


def test_ner_scrubs_names_and_addresses_with_a_spacy_pipeline_in_every_worker(tmp_path):
    model = ruler_pipeline(tmp_path / "ner")
    docs = [
        "Write to Jane Doe at 221 Baker Street, London NW1 6XE, about the parcel.",
        "Arjun Mehta met Marie Curie at 14 Rue Cuvier, Paris.",
        "def area(r):\n    return 3.14 * r ** 2  # version 1.2.3, sha 9f86d081\n",
    ] * 40
    filler = " ".join(["the parcel went by rail and then by road"] * 500)  # 20 KB: two pool tasks' worth in all
    for i, text in enumerate(docs):
        (tmp_path / f"d{i:03d}.txt").write_text(f"{text}\n{filler}\n")
    out = tmp_path / "ds"
    stages = StageSettings(pii=True, pii_ner=True, pii_ner_model=str(model))
    prepare_dataset([str(tmp_path / "*.txt")], out, vocab_size=300, val_fraction=0.1, stages=stages, workers=2)
    text = dataset_text(out)
    for name in ("Jane", "Doe", "Arjun", "Mehta", "Curie", "Baker Street", "Rue Cuvier", "NW1"):
        assert name not in text
    assert "<PERSON>" in text and "<ADDRESS>" in text and "3.14 * r ** 2" in text and "1.2.3" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["stages"]["pii_ner_model"] == str(model.resolve())
    pii = manifest["stages"]["pii"]
    assert (pii["replacements.PERSON"], pii["replacements.ADDRESS"]) == (120, 80)


def test_ner_finds_people_and_street_addresses_when_spacy_and_its_model_are_installed():
    spacy = pytest.importorskip("spacy")
    if not spacy.util.is_package(keel.data.pii_ner.MODEL):
        pytest.skip(f"the spaCy model {keel.data.pii_ner.MODEL} is not installed")
    text, counts = scrub("Write to Jane Doe at 221 Baker Street, London NW1 6XE.", ner=keel.data.pii_ner.MODEL)
    assert counts["PERSON"] == 1 and counts["ADDRESS"] == 1, text
