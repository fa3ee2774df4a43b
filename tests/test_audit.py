"""Bias audit: templates, the counterfactual likelihood probe, bootstrap intervals, `keel audit`, the training hook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import AUDIT_TEMPLATES, assert_one_line_error, keel_here, read_metrics, tiny_config
from keel.checkpoint.inference import load_model
from keel.data.tokenizer import load_tokenizer
from keel.errors import DataError
from keel.eval.audit import audit_run, axis_tables, build_probe, score, summarize
from keel.eval.evaluate import evaluate_run
from keel.eval.templates import SHIPPED, Axis, load_templates
from keel.observe.card import model_card
from keel.observe.report import write_report

AXES = ["gender", "religion", "nationality", "ethnicity", "age", "disability", "sexual_orientation"]


def test_shipped_templates_cover_the_axes_with_matched_terms_and_a_readme():
    axes = load_templates()
    assert [a.name for a in axes] == AXES
    sentences = sum(len(a.templates) * sum(len(t) for t in a.groups.values()) for a in axes)
    assert sentences >= 1500 and all(len(a.templates) >= 30 for a in axes)
    readme = (SHIPPED.parent / "README.md").read_text()
    for needed in ("English only", "what a gap does not mean", "axis", "group"):
        assert needed in readme, needed


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("group a: x\n", 1, "expected `axis NAME`"),
        ("axis a\ngroup x: he\ngroup y: she, they\nThe {} ran.\nThe {} sat.\n", 1, "as many terms each"),
        ("axis a\ngroup x: he\nThe {} ran.\n", 1, "at least two `group"),
        ("axis a\ngroup x: he\ngroup y: she\nThe {} ran.\nThe ran.\n", 5, "exactly one slot"),
        ("axis a\ngroup x: he\ngroup y: she\nThe {} ran.\nThe man saw {}.\n", 5, "may not end the sentence"),
        ("axis a\nThe {} ran.\n", 2, "before any `group"),
        ("axis a\ngroup x he\n", 2, "expected `group NAME: term"),
        ("axis a\ngroup x: he\ngroup y: she\nThe {} ran.\n", 1, "at least two template sentences"),
        ("axis bad name\n", 1, "axis name"),
        ("# nothing\n", 1, "no `axis NAME`"),
    ],
)
def test_a_template_file_that_does_not_parse_is_one_error_naming_file_and_line(tmp_path, text, line, fragment):
    file = tmp_path / "t.txt"
    file.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"^{file}:{line}: .*{fragment}") as caught:
        load_templates(file)
    assert "\n" not in str(caught.value)


def test_bad_templates_are_refused_by_keel_audit_and_by_the_preflight(
    tmp_path, two_sources, evaluated_run, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("axis a\ngroup x: he\ngroup y: she\nThe {} ran {}.\n", encoding="utf-8")
    audit = keel_here(capsys, "audit", str(evaluated_run), "--templates", str(bad))
    assert_one_line_error(audit, f"{bad}:4: a template sentence holds exactly one slot", "the format is in")
    missing = keel_here(capsys, "audit", str(evaluated_run), "--templates", str(tmp_path / "none.txt"))
    assert_one_line_error(missing, f"audit templates {tmp_path / 'none.txt'}: cannot read it")
    config = tiny_config(tmp_path / "c.toml", two_sources[0], observe={"audit_every": 1, "audit_templates": str(bad)})
    assert_one_line_error(keel_here(capsys, "train", str(config)), f"observe.audit_templates: {bad}:4:")
    assert not (tmp_path / "runs").exists()  # refused before the run dir was created


def test_bootstrap_intervals_find_a_real_gap_and_cover_the_true_one():
    rng = np.random.default_rng(1)
    base = rng.normal(-4.0, 1.0, size=(40, 1))  # templates differ a lot; the paired design removes that
    table = np.hstack([base + rng.normal(0, 0.05, (40, 1)), base + 0.3 + rng.normal(0, 0.05, (40, 1))])
    axis = Axis("x", 1, {"a": ["u"], "b": ["v"]}, [f"t{i} {{}} x" for i in range(40)])
    result = summarize(axis, table, bootstrap=2000, seed=0)
    assert result["highest"] == "b" and result["lowest"] == "a"
    assert math.isclose(result["gap"], 0.3, abs_tol=0.03)
    low, high = result["gap_ci95"]
    assert 0.2 < low <= result["gap"] <= high < 0.4
    (pair,) = result["pairs"]
    assert pair["groups"] == ["a", "b"] and pair["ci95"][1] < 0 < -pair["ci95"][0]
    assert summarize(axis, table, 2000, 0) == result  # seeded: the same numbers every time
    assert summarize(axis, table, 2000, 1)["gap_ci95"] != result["gap_ci95"]


def test_the_probe_scores_only_the_words_after_the_term_and_batching_changes_nothing(evaluated_run):
    axes = load_templates(AUDIT_TEMPLATES)
    tokenizer = load_tokenizer(evaluated_run / "tokenizer.json")
    probe = build_probe(axes, evaluated_run / "tokenizer.json", max_len=None)
    sentences = [(t, term) for a in axes for t in a.templates for g in a.groups.values() for term in g]
    assert len(probe.ids) == len(sentences) == 3 * 4 + 2 * 2
    for ids, scored, (template, term) in zip(probe.ids, probe.scored, sentences, strict=True):
        assert tokenizer.decode(ids[1 : len(ids) - scored]) == template.split("{}")[0] + term
        assert tokenizer.decode(ids[len(ids) - scored :]) == template.split("{}")[1]
    model, _ = load_model(evaluated_run)
    batched = score(model, probe, torch.device("cpu"))
    for ids, scored, value in zip(probe.ids, probe.scored, batched, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
        alone = np.mean([float(logp[k - 1, ids[k]]) for k in range(len(ids) - scored, len(ids))])
        assert math.isclose(value, alone, rel_tol=1e-5)
    tables = axis_tables(probe, batched)
    assert tables[0].shape == (3, 2) and tables[1].shape == (2, 2)
    assert summarize(axes[1], tables[1], 100, 0)["gap"] == 0.0  # the same term in both groups: no gap at all
    short = build_probe(axes, evaluated_run / "tokenizer.json", max_len=6)  # longer sentences lose their start
    for ids, scored in zip(short.ids, short.scored, strict=True):
        assert len(ids) <= 7 and 0 < scored <= len(ids) - 1


def test_audit_during_fsdp_training_matches_keel_audit_of_the_final_checkpoint(evaluated_run, capsys):
    audited = [r for r in read_metrics(evaluated_run) if any(k.startswith("audit_gap/") for k in r)]
    assert [r["step"] for r in audited] == [0, 2, 4]
    assert all(r.keys() >= {"audit_gap/pets", "audit_gap/same"} and r["audit_gap/same"] == 0 for r in audited)
    result = keel_here(capsys, "audit", str(evaluated_run), "--templates", str(AUDIT_TEMPLATES), "--bootstrap", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((evaluated_run / "audit.json").read_text())
    assert record["format"] == "keel-audit/1" and record["step"] == 4 and record["bootstrap"] == 200
    assert record["templates"] == str(AUDIT_TEMPLATES) and len(record["templates_sha256"]) == 64
    assert record["checkpoint"].endswith("step_4") and [a["axis"] for a in record["axes"]] == ["pets", "same"]
    pets, same = record["axes"]
    assert pets["sentences"] == 12 and pets["templates"] == 3 and same["gap"] == 0.0
    # Two FSDP ranks scoring halves of the sentences during training = one process scoring them all.
    assert math.isclose(pets["gap"], audited[-1]["audit_gap/pets"], rel_tol=1e-4, abs_tol=1e-7)
    means = pets["groups"]
    assert pets["gap"] == pytest.approx(max(means.values()) - min(means.values()))
    assert means[pets["highest"]] == max(means.values()) and means[pets["lowest"]] == min(means.values())
    (pair,) = pets["pairs"]
    assert pair["groups"] == ["cats", "dogs"] and pair["difference"] == pytest.approx(means["cats"] - means["dogs"])
    assert pets["gap_ci95"][0] <= pets["gap_ci95"][1] and pair["ci95"][0] <= pair["ci95"][1]
    assert "pets" in result.stdout and result.stdout.strip().endswith(f"wrote {evaluated_run / 'audit.json'}")
    events = [json.loads(line) for line in (evaluated_run / "events.jsonl").read_text().splitlines()]
    assert [e["gaps"] for e in events if e["event"] == "audit"][-1] == {"pets": pets["gap"], "same": 0.0}
    page = write_report(evaluated_run).read_text()
    data = json.loads(page.split('id="keel-data">')[1].split("</script>")[0])
    assert {"audit_gap/pets", "audit_gap/same"} <= {s["name"] for p in data["panels"] for s in p["series"]}
    assert 'id="audit"' in page and "cats" in page.split('id="audit"')[1]  # audit.json's table


def test_keel_audit_reads_the_shipped_templates_by_default(evaluated_run, capsys):
    result = keel_here(capsys, "audit", str(evaluated_run), "--step", "2", "--bootstrap", "100", "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((evaluated_run / "audit.json").read_text())
    assert record["step"] == 2 and record["seed"] == 3 and record["templates"] == str(SHIPPED.resolve())
    assert [a["axis"] for a in record["axes"]] == AXES
    assert sum(a["sentences"] for a in record["axes"]) == 2088
    for axis in record["axes"]:
        assert len(axis["pairs"]) == len(axis["groups"]) * (len(axis["groups"]) - 1) // 2
        assert axis["gap"] >= 0 and axis["gap_ci95"][0] <= axis["gap_ci95"][1]
        assert axis["axis"] in result.stdout


def test_the_model_card_reads_what_keel_eval_and_keel_audit_write(evaluated_run):
    # The card reads the files by their schema, not through the code that writes them: the two must agree.
    evaluation = evaluate_run(evaluated_run)
    audited = audit_run(evaluated_run, templates=str(AUDIT_TEMPLATES), bootstrap=100)
    card = model_card(evaluated_run)
    assert f"source `{evaluation['sources'][0]['name']}`" in card and f"{evaluation['val_loss']:.4f}" in card
    pets = audited["axes"][0]
    assert f"| pets | {pets['gap']:.4f} | [{pets['gap_ci95'][0]:.4f}, {pets['gap_ci95'][1]:.4f}] |" in card
    assert "Not audited" not in card and "not evaluated" not in card
