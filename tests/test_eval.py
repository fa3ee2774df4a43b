"""Evaluation: validation loss and perplexity per source and per mixture dataset, `keel eval`, lm-eval tasks."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, read_metrics, run_keel, tiny_config
from keel.checkpoint.inference import load_model
from keel.data.dataset import TokenDataset
from keel.data.loader import eval_sample_ids, read_samples
from keel.data.prepare import prepare_dataset
from keel.data.tokenizer import load_tokenizer
from keel.eval.sources import short_names, source_map

LETTERS, DIGITS = "letters/*.txt", "digits/*.txt"


def _corpus(directory: Path, alphabet: str, files: int, seed: int) -> str:
    """Files of short documents whose words use only `alphabet`: every token tells which corpus it came from."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for i in range(files):
        words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(8, 30)))
        (directory / f"{i:03d}.txt").write_text(" ".join(words), encoding="utf-8")
    return str(directory / "*.txt")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset of two sources (letter words, digit words), and a second dataset with its tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    both, extra = root / "both", root / "extra"
    corpus = root / "corpus"
    globs = [_corpus(corpus / "letters", "abcdefgh", 60, 0), _corpus(corpus / "digits", "0123456789", 60, 1)]
    prepare_dataset(globs, both, vocab_size=320, val_fraction=0.2, log=lambda _: None)
    prepare_dataset(
        [_corpus(corpus / "extra", "abcd0123", 40, 2)],
        extra,
        tokenizer=str(both / "tokenizer.json"),
        val_fraction=0.2,
        log=lambda _: None,
    )
    return both, extra


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sources) -> Path:
    """A tiny run on the mixture of both datasets, validated every 2 steps, with checkpoints at steps 2 and 4."""
    both, extra = sources
    tmp = tmp_path_factory.mktemp("evalrun")
    config = tiny_config(
        tmp / "c.toml",
        both,
        train={"steps": 4, "eval_every": 2},
        data={"mixture": {str(both): 1.0, str(extra): 1.0}},
        checkpoint={"every": 2},
    )
    result = run_keel("train", str(config), cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "tiny"


def test_short_names_drop_the_directories_all_paths_share():
    assert short_names(["/d/c/letters/*.txt", "/d/c/digits/*.txt"]) == [LETTERS, DIGITS]
    assert short_names(["/data/web", "/data/code/v2"]) == ["web", "code/v2"]
    assert short_names(["/usr/lib/python3/**/*.py"]) == ["*.py"]


def test_every_validation_token_counts_to_the_source_of_its_document(sources):
    # Letter words and digit words share no token but EOS, so each target token's text names its true source.
    both, _ = sources
    smap = source_map(both, "val")
    assert smap is not None and smap.names == [LETTERS, DIGITS]
    dataset = TokenDataset(both, "val")
    tokenizer = load_tokenizer(both / "tokenizer.json")
    ids = next(eval_sample_ids(dataset, seq_len=32, batch_size=64, num_batches=1, rank=0, world_size=1))
    targets = read_samples(dataset, ids, 32).targets
    found = smap.of_targets(ids, 32)
    checked = set()
    for token, source in zip(targets.flatten().tolist(), found.flatten().tolist(), strict=True):
        text = tokenizer.decode([token])
        if token == dataset.eos_id or not text.strip():
            continue  # EOS and bare spaces occur in both
        checked.add(source)
        assert source == (1 if any(c.isdigit() for c in text) else 0), (text, source)
    assert checked == {0, 1}


def test_training_logs_loss_and_perplexity_per_source_and_per_mixture_dataset(trained):
    evals = [r for r in read_metrics(trained) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        for name in (LETTERS, DIGITS):
            assert math.isclose(r[f"val_ppl/{name}"], math.exp(r[f"val_loss/{name}"]), rel_tol=1e-9)
        low, high = sorted([r[f"val_loss/{LETTERS}"], r[f"val_loss/{DIGITS}"]])
        assert low <= r["val_loss"] <= high  # the overall loss is the token-weighted mean of the two
        assert r["val_loss_mixture/both"] == r["val_loss"]  # data.dataset in the mixture is its own val split
        assert r["val_loss_mixture/extra"] != r["val_loss"]
        assert math.isclose(r["val_ppl_mixture/extra"], math.exp(r["val_loss_mixture/extra"]), rel_tol=1e-9)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_keel_eval_recomputes_the_training_metrics_from_a_checkpoint(trained):
    metrics = {r["step"]: r for r in read_metrics(trained) if "val_loss" in r}
    for step in (None, 2):
        args = ["eval", str(trained)] + (["--step", str(step)] if step else [])
        result = run_keel(*args, cwd=trained.parent)
        assert result.returncode == 0, result.stdout + result.stderr
        record = json.loads((trained / "eval.json").read_text())
        logged = metrics[step or 4]
        assert record["format"] == "keel-eval/1" and record["step"] == (step or 4)
        assert math.isclose(record["val_loss"], logged["val_loss"], rel_tol=1e-5)
        assert [s["name"] for s in record["sources"]] == [LETTERS, DIGITS]
        for s in record["sources"]:
            assert math.isclose(s["val_loss"], logged[f"val_loss/{s['name']}"], rel_tol=1e-5)
            assert s["glob"].endswith(s["name"])
        assert sum(s["tokens"] for s in record["sources"]) == record["tokens"] == 4 * 8 * 32
        weighted = sum(s["val_loss"] * s["tokens"] for s in record["sources"]) / record["tokens"]
        assert math.isclose(weighted, record["val_loss"], rel_tol=1e-9)
        mixture = {m["name"]: m for m in record["mixture"]}
        assert mixture.keys() == {"both", "extra"} and mixture["extra"]["weight"] == 1.0
        assert math.isclose(mixture["extra"]["val_loss"], logged["val_loss_mixture/extra"], rel_tol=1e-5)
        assert "source letters/*.txt: val_loss" in result.stdout
    result = run_keel("eval", str(trained), "--batches", "1", cwd=trained.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((trained / "eval.json").read_text())
    assert record["samples"] == 8 and record["tokens"] == 8 * 32 == sum(s["tokens"] for s in record["sources"])
    events = [json.loads(line) for line in (trained / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 2, 4]
    report = run_keel("report", str(trained), cwd=trained.parent)
    assert report.returncode == 0, report.stderr
    page = (trained / "report.html").read_text()
    assert ">eval<" not in page  # an evaluation is no incident
    for panel in (
        "Validation loss per source",
        "Validation perplexity per source",
        "Validation loss per mixture dataset",
    ):
        assert f'alt="{panel}"' in page


def test_keel_eval_of_a_missing_step_or_run_is_one_line(trained, tmp_path):
    assert_one_line_error(
        run_keel("eval", str(trained), "--step", "3", cwd=tmp_path), "no committed checkpoint at step 3"
    )
    assert_one_line_error(run_keel("eval", str(tmp_path), cwd=tmp_path), "not a Keel run dir")


def _choice_task(directory: Path) -> Path:
    """A two-choice task in a YAML file with its JSON Lines data beside it (a relative data_files path)."""
    docs = [
        {"context": "abc dab", "choices": [" cab", " 0123"], "label": 0},
        {"context": "12 301", "choices": [" abba", " 2210"], "label": 1},
        {"context": "ab ba ab", "choices": [" ba", " 99"], "label": 0},
        {"context": "ha ha", "choices": [" 7", " ha"], "label": 1},
        {"context": "0 1 2 3", "choices": [" 4", " d"], "label": 0},
        {"context": "fed cba", "choices": [" 5", " gh"], "label": 1},
    ]
    directory.mkdir()
    (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    task = directory / "pick.yaml"
    task.write_text(
        "task: keel_test_pick\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: docs.jsonl\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n',
        encoding="utf-8",
    )
    return task


def _keel_accuracy(run: Path, task: Path) -> float:
    """The task's accuracy computed with Keel's own model: the choice of highest summed log-likelihood."""
    model, _ = load_model(run)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    docs = [json.loads(line) for line in (task.parent / "docs.jsonl").read_text().splitlines()]
    right = 0
    for doc in docs:
        context = tokenizer.encode(doc["context"]).ids
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer.encode(doc["context"] + choice).ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
            scores.append(sum(float(logp[k - 1, ids[k]]) for k in range(len(context), len(ids))))
        right += scores.index(max(scores)) == doc["label"]
    return right / len(docs)


def test_harness_runs_keel_and_local_tasks_offline_on_the_hf_export(trained, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    task = _choice_task(tmp_path / "task")
    # Offline, with a private cache: the local tasks need no network, and nothing lands in ~/.cache.
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    result = run_keel("eval", str(trained), "--harness", f"keel_python_syntax,{task}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    harness = json.loads((trained / "eval.json").read_text())["harness"]
    assert harness["lm_eval"] == "0.4.13"
    tasks = harness["tasks"]
    assert tasks["keel_python_syntax"]["samples"] == 40 and 0 <= tasks["keel_python_syntax"]["acc"] <= 1
    assert tasks["keel_test_pick"]["samples"] == 6
    assert tasks["keel_test_pick"]["acc"] == _keel_accuracy(trained, task)
    assert "harness keel_test_pick: acc" in result.stdout


def test_harness_refuses_an_unknown_task_before_any_work(trained, tmp_path):
    pytest.importorskip("lm_eval")
    events = (trained / "events.jsonl").read_text()
    result = run_keel("eval", str(trained), "--harness", "no_such_task_anywhere", cwd=tmp_path, timeout=600)
    assert_one_line_error(result, "--harness no_such_task_anywhere: no such lm-eval task")
    assert (trained / "events.jsonl").read_text() == events  # refused before evaluating: no `eval` event
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n", encoding="utf-8")
    assert_one_line_error(run_keel("eval", str(trained), "--harness", str(bad), cwd=tmp_path), f"{bad}: not a readable")


def test_a_dataset_without_lineage_has_no_per_source_metrics(sources, tmp_path):
    both, _ = sources
    copy = tmp_path / "old"
    copy.mkdir()
    manifest = json.loads((both / "manifest.json").read_text())
    for item in both.rglob("*"):
        if item.is_file() and item.suffix != ".docs" and item.name != "manifest.json":
            target = copy / item.relative_to(both)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard.pop("origins")
    (copy / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert source_map(copy, "val") is None
