"""Bias audit: templates, the counterfactual likelihood probe, bootstrap intervals, `keel audit`, the training hook."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, read_metrics, run_keel, tiny_config
from keel.checkpoint.inference import load_model
from keel.data.tokenizer import load_tokenizer
from keel.errors import DataError
from keel.eval.audit import axis_tables, build_probe, score, summarize
from keel.eval.templates import SHIPPED, Axis, load_templates

AXES = ["gender", "religion", "nationality", "ethnicity", "age", "disability", "sexual_orientation"]
SMALL = """# two axes, to run quickly
axis pets
group cats: cat, kitten
group dogs: dog, puppy
The {} slept on the warm kitchen floor.
My {} ran across the garden after the ball.
Our neighbour said the {} was very quiet today.

axis same
group a: house
group b: house
The {} stood at the end of the road.
Nobody had lived in the {} for years.
"""


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, dataset):
    """A tiny run trained by two FSDP processes with the audit every 2 steps."""
    tmp = tmp_path_factory.mktemp("audit")
    config = tiny_config(tmp / "c.toml", dataset, train={"steps": 4}, observe={"audit_every": 2})
    result = run_keel("train", str(config), "--nproc", "2", cwd=tmp, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "tiny"


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


def test_bad_templates_are_refused_by_keel_audit_and_by_the_preflight(tmp_path, dataset, fsdp_run):
    bad = tmp_path / "bad.txt"
    bad.write_text("axis a\ngroup x: he\ngroup y: she\nThe {} ran {}.\n", encoding="utf-8")
    audit = run_keel("audit", str(fsdp_run), "--templates", str(bad), cwd=tmp_path)
    assert_one_line_error(audit, f"{bad}:4: a template sentence holds exactly one slot")
    config = tiny_config(tmp_path / "c.toml", dataset, observe={"audit_every": 1, "audit_templates": str(bad)})
    assert_one_line_error(run_keel("train", str(config), cwd=tmp_path), f"observe.audit_templates: {bad}:4:")
    assert not (tmp_path / "runs").exists()


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


def test_the_probe_scores_only_the_words_after_the_term_and_batching_changes_nothing(tmp_path, fsdp_run):
    file = tmp_path / "small.txt"
    file.write_text(SMALL, encoding="utf-8")
    axes = load_templates(file)
    tokenizer = load_tokenizer(fsdp_run / "tokenizer.json")
    probe = build_probe(axes, fsdp_run / "tokenizer.json", max_len=None)
    sentences = [(t, term) for a in axes for t in a.templates for g in a.groups.values() for term in g]
    assert len(probe.ids) == len(sentences) == 3 * 4 + 2 * 2
    for ids, scored, (template, term) in zip(probe.ids, probe.scored, sentences, strict=True):
        assert tokenizer.decode(ids[1 : len(ids) - scored]) == template.split("{}")[0] + term
        assert tokenizer.decode(ids[len(ids) - scored :]) == template.split("{}")[1]
    model, _ = load_model(fsdp_run)
    batched = score(model, probe, torch.device("cpu"))
    for ids, scored, value in zip(probe.ids, probe.scored, batched, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
        alone = np.mean([float(logp[k - 1, ids[k]]) for k in range(len(ids) - scored, len(ids))])
        assert math.isclose(value, alone, rel_tol=1e-5)
    tables = axis_tables(probe, batched)
    assert tables[0].shape == (3, 2) and tables[1].shape == (2, 2)
    assert summarize(axes[1], tables[1], 100, 0)["gap"] == 0.0  # the same term in both groups: no gap at all
    short = build_probe(axes, fsdp_run / "tokenizer.json", max_len=6)  # longer sentences lose their start
    for ids, scored in zip(short.ids, short.scored, strict=True):
        assert len(ids) <= 7 and 0 < scored <= len(ids) - 1


def test_audit_during_fsdp_training_matches_keel_audit_of_the_final_checkpoint(fsdp_run, tmp_path):
    audited = [r for r in read_metrics(fsdp_run) if any(k.startswith("audit_gap/") for k in r)]
    assert [r["step"] for r in audited] == [0, 2, 4]
    assert all({f"audit_gap/{a}" for a in AXES} <= r.keys() for r in audited)
    result = run_keel("audit", str(fsdp_run), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((fsdp_run / "audit.json").read_text())
    assert record["format"] == "keel-audit/1" and record["step"] == 4 and record["bootstrap"] == 1000
    assert record["templates"] == str(SHIPPED.resolve())
    for axis in record["axes"]:
        # Two FSDP ranks scoring halves of the sentences during training = one process scoring them all.
        assert math.isclose(axis["gap"], audited[-1][f"audit_gap/{axis['axis']}"], rel_tol=1e-4, abs_tol=1e-7)
        means = axis["groups"]
        assert axis["gap"] == pytest.approx(max(means.values()) - min(means.values()))
        assert means[axis["highest"]] == max(means.values()) and means[axis["lowest"]] == min(means.values())
        assert len(axis["pairs"]) == len(means) * (len(means) - 1) // 2
        assert axis["gap_ci95"][0] <= axis["gap_ci95"][1]
        assert f"{axis['axis']}" in result.stdout
    events = [json.loads(line) for line in (fsdp_run / "events.jsonl").read_text().splitlines()]
    assert [e["gaps"].keys() == set(AXES) for e in events if e["event"] == "audit"] == [True]
    assert run_keel("report", str(fsdp_run), cwd=tmp_path).returncode == 0
    assert 'alt="Bias audit: log-likelihood gap per axis"' in (fsdp_run / "report.html").read_text()


def test_keel_audit_takes_the_users_templates(fsdp_run, tmp_path):
    file = tmp_path / "mine.txt"
    file.write_text(SMALL, encoding="utf-8")
    result = run_keel("audit", str(fsdp_run), "--templates", str(file), "--bootstrap", "200", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((fsdp_run / "audit.json").read_text())
    assert record["templates"] == str(file) and [a["axis"] for a in record["axes"]] == ["pets", "same"]
    assert record["axes"][1]["gap"] == 0.0 and record["axes"][0]["sentences"] == 12
