"""Evaluation: validation loss and perplexity per source and per mixture dataset, `keel eval`, lm-eval tasks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, keel_here, read_metrics, run_keel
from keel.checkpoint.inference import load_model
from keel.data.dataset import TokenDataset
from keel.data.loader import eval_sample_ids, read_samples
from keel.data.tokenizer import load_tokenizer
from keel.errors import ConfigError
from keel.eval.evaluate import evaluate_run
from keel.eval.harness import task_spec
from keel.eval.sources import short_names, source_map
from keel.observe.report import write_report

LETTERS, DIGITS = "letters/*.txt", "digits/*.txt"


def test_short_names_drop_the_directories_all_paths_share():
    assert short_names(["/d/c/letters/*.txt", "/d/c/digits/*.txt"]) == [LETTERS, DIGITS]
    assert short_names(["/data/web", "/data/code/v2"]) == ["web", "code/v2"]
    assert short_names(["/usr/lib/python3/**/*.py"]) == ["*.py"]


def test_every_validation_token_counts_to_the_source_of_its_document(two_sources):
    # Letter words and digit words share no token but EOS, so each target token's text names its true source.
    both, _ = two_sources
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


def test_training_logs_loss_and_perplexity_per_source_and_per_mixture_dataset(evaluated_run):
    evals = [r for r in read_metrics(evaluated_run) if "val_loss" in r]
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


def test_keel_eval_recomputes_the_training_metrics_from_a_checkpoint(evaluated_run, capsys, monkeypatch):
    # Training validated on two ranks, each its slice of the windows; `keel eval` reads them all in one process.
    metrics = {r["step"]: r for r in read_metrics(evaluated_run) if "val_loss" in r}
    monkeypatch.chdir(evaluated_run.parent)
    before = len((evaluated_run / "events.jsonl").read_text().splitlines())  # the run is shared: others evaluate it too
    result = keel_here(capsys, "eval", str(evaluated_run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "source letters/*.txt: val_loss" in result.stdout and "mixture extra (weight 1): val_loss" in result.stdout
    assert result.stdout.strip().endswith(f"wrote {evaluated_run / 'eval.json'}")
    newest = json.loads((evaluated_run / "eval.json").read_text())
    older = evaluate_run(evaluated_run, step=2)
    assert json.loads((evaluated_run / "eval.json").read_text()) == older  # each evaluation replaces the file
    for record in (newest, older):
        logged = metrics[record["step"]]
        assert record["format"] == "keel-eval/1" and record["checkpoint"].endswith(f"step_{record['step']}")
        assert math.isclose(record["val_loss"], logged["val_loss"], rel_tol=1e-5)
        assert math.isclose(record["val_ppl"], logged["val_ppl"], rel_tol=1e-5)
        assert [s["name"] for s in record["sources"]] == [LETTERS, DIGITS]
        for s in record["sources"]:
            assert math.isclose(s["val_loss"], logged[f"val_loss/{s['name']}"], rel_tol=1e-5)
            assert s["glob"].endswith(s["name"])
        assert record["samples"] == 4 * 8 and record["seq_len"] == 32
        assert sum(s["tokens"] for s in record["sources"]) == record["tokens"] == 4 * 8 * 32
        weighted = sum(s["val_loss"] * s["tokens"] for s in record["sources"]) / record["tokens"]
        assert math.isclose(weighted, record["val_loss"], rel_tol=1e-9)
        mixture = {m["name"]: m for m in record["mixture"]}
        assert mixture.keys() == {"both", "extra"} and mixture["extra"]["weight"] == 1.0
        assert mixture["both"]["val_loss"] == record["val_loss"]  # data.dataset is also a mixture dataset
        assert math.isclose(mixture["extra"]["val_loss"], logged["val_loss_mixture/extra"], rel_tol=1e-5)
        assert "harness" not in record
    one = evaluate_run(evaluated_run, batches=1)
    assert one["step"] == 4 and one["samples"] == 8
    assert one["tokens"] == 8 * 32 == sum(s["tokens"] for s in one["sources"])
    events = [json.loads(line) for line in (evaluated_run / "events.jsonl").read_text().splitlines()[before:]]
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 2, 4]
    page = write_report(evaluated_run).read_text()
    data = json.loads(page.split('id="keel-data">')[1].split("</script>")[0])
    panels = {p["id"]: [s["name"] for s in p["series"]] for p in data["panels"]}
    assert panels["val_sources"] == ["val_loss", f"val_loss/{DIGITS}", f"val_loss/{LETTERS}"]
    assert panels["val_ppl_sources"] == ["val_ppl", f"val_ppl/{DIGITS}", f"val_ppl/{LETTERS}"]
    assert set(panels["val_mixture"]) == {"val_loss_mixture/both", "val_loss_mixture/extra"}
    assert set(panels["val_ppl_mixture"]) == {"val_ppl_mixture/both", "val_ppl_mixture/extra"}
    assert 'id="validation"' in page and "extra" in page.split('id="validation"')[1]  # eval.json's table


def test_keel_eval_of_a_missing_step_or_run_is_one_line(evaluated_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(
        keel_here(capsys, "eval", str(evaluated_run), "--step", "3"), "no committed checkpoint at step 3"
    )
    assert_one_line_error(keel_here(capsys, "eval", str(tmp_path)), "not a Keel run dir")
    assert_one_line_error(keel_here(capsys, "eval", str(evaluated_run), "--harness", " , "), "--harness: no task named")


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


@pytest.mark.soak  # lm-eval's import, the export and two tasks: half a minute
def test_harness_runs_keel_and_local_tasks_offline_on_the_hf_export(evaluated_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    task = _choice_task(tmp_path / "task")
    # Offline, with a private cache: the local tasks need no network, and nothing lands in ~/.cache.
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    result = run_keel("eval", str(evaluated_run), "--harness", f"keel_python_syntax,{task}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((evaluated_run / "eval.json").read_text())
    harness = record["harness"]
    assert harness["lm_eval"] == "0.4.13" and harness["limit"] is None
    tasks = harness["tasks"]
    assert tasks.keys() == {"keel_python_syntax", "keel_test_pick"}
    syntax = tasks["keel_python_syntax"]
    assert syntax["samples"] == 40 and 0 <= syntax["acc"] <= 1 and 0 <= syntax["acc_norm"] <= 1
    assert syntax["acc_stderr"] > 0
    assert tasks["keel_test_pick"]["samples"] == 6
    # lm-eval scored the export exactly as Keel's own model scores the choices.
    assert tasks["keel_test_pick"]["acc"] == _keel_accuracy(evaluated_run, task)
    assert "harness keel_test_pick: acc" in result.stdout
    assert record["val_loss"] is not None  # the harness comes on top of validation, not instead of it
    limited = run_keel("eval", str(evaluated_run), "--harness", "keel_python_syntax", "--limit", "5", cwd=tmp_path)
    assert limited.returncode == 0, limited.stdout + limited.stderr
    harness = json.loads((evaluated_run / "eval.json").read_text())["harness"]
    assert harness["limit"] == 5 and harness["tasks"]["keel_python_syntax"]["samples"] == 5


@pytest.mark.soak  # indexing lm-eval's thousands of task files takes half a minute
def test_harness_refuses_an_unknown_task_before_any_work(evaluated_run, tmp_path):
    pytest.importorskip("lm_eval")
    events = (evaluated_run / "events.jsonl").read_text()
    result = run_keel("eval", str(evaluated_run), "--harness", "no_such_task_anywhere", cwd=tmp_path, timeout=600)
    assert_one_line_error(result, "--harness no_such_task_anywhere: no such lm-eval task")
    assert (evaluated_run / "events.jsonl").read_text() == events  # refused before evaluating: no `eval` event


def test_keels_task_resolves_to_its_local_data_and_a_bad_task_file_is_one_line(tmp_path):
    spec = task_spec("keel_python_syntax")
    assert isinstance(spec, dict) and spec["task"] == "keel_python_syntax"
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and len(data.read_text().splitlines()) == 40
    task = _choice_task(tmp_path / "task")
    assert task_spec(str(task))["dataset_kwargs"]["data_files"] == {"test": str(task.parent / "docs.jsonl")}
    assert task_spec("hellaswag") == "hellaswag"  # lm-eval's own tasks go by name
    cases = {
        "unclosed.yaml": ("task: [unclosed\n", "not a readable task YAML"),
        # A file is data: code it names (`!function`) is refused, not imported.
        "code.yaml": ("task: t\nprocess_docs: !function utils.process_docs\n", "not a readable task YAML"),
        "list.yaml": ("- task: t\n", "a task file is a YAML mapping with a `task` key"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=f"^--harness {tmp_path / name}: {fragment}") as caught:
            task_spec(str(tmp_path / name))
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="no such task file"):
        task_spec(str(tmp_path / "missing.yaml"))


def test_a_dataset_without_lineage_has_no_per_source_metrics(two_sources, tmp_path):
    both, _ = two_sources
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
