"""`keel data lineage --run`: which steps of real runs read a document, and which checkpoints have seen it since."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import assert_one_line_error, quiet, run_keel, tiny_config
from keel.checkpoint.commit import committed_steps
from keel.cli import app
from keel.config_toml import load_config
from keel.data.dataset import TokenDataset
from keel.data.lineage import document_spans, find_documents
from keel.data.loader import BatchLoader
from keel.data.manifest import load_manifest
from keel.data.prepare import prepare_dataset
from keel.data.versions import document_versions
from keel.errors import DataError
from keel.train.lineage import run_lineage

NAME = "Zorblax Quintavius"
SEQ, BATCH = 32, 8  # tiny_config's train.seq_len and train.global_batch_size


def corpus(path: Path, seed: int, marker: bool) -> Path:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    if marker:
        docs[4] = " ".join([NAME] * 20)  # document 5: no token of it occurs anywhere else
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def train(tmp: Path, name: str, dataset: Path, seed: int, **sections: dict) -> Path:
    checkpoint = {"every": 10, "keep": 3}
    config = tiny_config(
        tmp / f"{name}.toml", dataset, run={"name": name, "seed": seed}, checkpoint=checkpoint, **sections
    )
    result = run_keel("train", str(config), cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A dataset and run a on it (seed 0; a loss spike at step 23 rolls steps 21-23 back to its step-20 checkpoint)."""
    tmp = tmp_path_factory.mktemp("lineage")
    data = tmp / "data"
    prepare_dataset([str(corpus(tmp / "a.jsonl", 2, True))], data, vocab_size=400, val_fraction=0.2, log=quiet)
    spike = {"inject": "spike:step=23", "spike_window": 10}
    return {"tmp": tmp, "data": data, "a": train(tmp, "a", data, 0, train={"steps": 30}, resilience=spike)}


def other_dataset(tmp: Path, data: Path) -> Path:
    """Another dataset with the same tokenizer (so a mixture of both is allowed)."""
    other = tmp / "other"
    if not other.exists():
        tokenizer = str(data / "tokenizer.json")
        prepare_dataset(
            [str(corpus(tmp / "o.jsonl", 3, False))], other, tokenizer=tokenizer, val_fraction=0.2, log=quiet
        )
    return other


def copy_run(run: Path, dataset: Path, into: Path) -> Path:
    """A copy of a run dir whose config names `dataset` (and the copy) instead of the originals."""
    copy = into / "runs" / run.name
    shutil.copytree(run, copy)
    config = (copy / "config.toml").read_text()
    old = load_config(run / "config.toml").data.dataset
    (copy / "config.toml").write_text(config.replace(f'"{old}"', f'"{dataset}"').replace(f'"{run}"', f'"{copy}"'))
    return copy


def steps_holding(loader: BatchLoader, tokens: set[int], reads: dict[int, int]) -> list[int]:
    """The steps whose batch (step -> batch position in `reads`) holds any of `tokens`, read from the loader itself."""
    found = []
    for step, position in reads.items():
        rows = torch.cat([torch.cat([b.inputs[:, :1], b.targets], 1) for b in loader.batch_at(position)])
        if np.isin(rows.numpy(), list(tokens)).any():
            found.append(step)
    return found


def marker_tokens(dataset: Path) -> set[int]:
    """The marked document's tokens but its EOS; checked to occur nowhere else in the split."""
    [span] = find_documents(dataset, "a.jsonl", 5)
    assert span.split == "train" and (span.end - 1) % SEQ != 0  # no window holds the document's EOS alone
    data = TokenDataset(dataset, "train")
    ids = set(data.read(span.start, span.end - span.start - 1).tolist())
    rest = np.concatenate([data.read(0, span.start), data.read(span.end, data.num_tokens - span.end)])
    assert not np.isin(rest, list(ids)).any()
    return ids


def loader(datasets: list[TokenDataset], seed: int, weights: list[float] | None = None) -> BatchLoader:
    return BatchLoader(
        datasets,
        weights=weights,
        seq_len=SEQ,
        global_batch_size=BATCH,
        micro_batch_size=BATCH,
        rank=0,
        world_size=1,
        seed=seed,
    )


def test_lineage_names_the_steps_that_read_the_document_as_the_loader_reads_them(trained):
    data, run = trained["data"], trained["a"]
    tokens, versions = marker_tokens(data), document_versions(data, "a.jsonl", 5)
    # The rollback from step 23 to the step-20 checkpoint skipped batches 20-22: step s > 20 reads batch s + 2.
    reads = {s: s - 1 if s <= 20 else s + 2 for s in range(1, 31)}
    got = run_lineage(data, versions, run)
    expected = steps_holding(loader([TokenDataset(data, "train")], 0), tokens, reads)
    assert got.steps == expected and expected and got.last == 30 and not got.validation
    assert got.checkpoints == [c for c in committed_steps(run / "checkpoints") if c >= expected[0]]
    undone = steps_holding(loader([TokenDataset(data, "train")], 0), tokens, {21: 20, 22: 21, 23: 22})
    assert got.undone == undone
    # Every training document, against the sample ids of each step's batch (windows of SEQ + 1 tokens at stride SEQ).
    order = loader([TokenDataset(data, "train")], 0)
    batches = {s: {order.locate(p * BATCH + i)[1] for i in range(BATCH)} for s, p in reads.items()}
    rolled = {s: {order.locate(p * BATCH + i)[1] for i in range(BATCH)} for s, p in {21: 20, 22: 21, 23: 22}.items()}
    after, undone_any = set(), set()
    for d in document_spans(data, load_manifest(data), "train"):
        got = run_lineage(data, document_versions(data, "a.jsonl", d.ordinal), run)
        holds = {i for i in range(d.end // SEQ + 1) if i * SEQ < d.end and i * SEQ + SEQ >= d.start}
        assert got.steps == [s for s, ids in batches.items() if ids & holds], d
        assert got.undone == [s for s, ids in rolled.items() if ids & holds], d
        after.update(s for s in got.steps if s > 20)
        undone_any.update(got.undone)
    assert after and undone_any  # steps after the rollback and steps it undid were both checked
    # A document of the validation split: evaluated on, never trained on.
    val = document_spans(data, load_manifest(data), "val")[0]
    in_val = run_lineage(data, document_versions(data, "a.jsonl", val.ordinal), run)
    assert in_val.validation and in_val.steps == [] and in_val.checkpoints == []
    lineage = ("data", "lineage", str(data), "--source", "a.jsonl", "--ordinal", "5", "--seq-len", str(SEQ))
    result = run_keel(*lineage, "--run", str(run), cwd=trained["tmp"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train document 5: tokens" in out and f"run {run} (seed 0, 30 steps, the dataset now): steps " in out
    held = ", ".join(f"step_{c}" for c in got.checkpoints)
    assert got.checkpoints and f"run {run}: committed checkpoints that have seen it: {held}\n" in out
    [line] = [x for x in out.splitlines() if x.endswith(" read it")]
    named = [r.split("-") for r in line.split("): step")[1].removeprefix("s").removesuffix(" read it").split(", ")]
    assert [s for r in named for s in range(int(r[0]), int(r[-1]) + 1)] == expected  # as ranges, in order


def test_lineage_for_a_run_trained_on_another_dataset_is_one_line_naming_it(trained, tmp_path):
    data, run = trained["data"], trained["a"]
    other = other_dataset(trained["tmp"], data)
    result = run_keel("data", "lineage", str(other), "--source", "o.jsonl", "--run", str(run), cwd=tmp_path)
    assert_one_line_error(result, f"run {run} was trained on another dataset ({data}", "pass the dataset the run")
    assert not list(tmp_path.iterdir())  # nothing written
    # The same path holding another dataset (prepared again in place): named as another version of it.
    again = tmp_path / "data"
    shutil.copytree(other, again)
    with pytest.raises(DataError, match=rf"run .* was trained on another version of {again} \(manifest hash "):
        run_lineage(again, document_versions(again, "o.jsonl"), copy_run(run, again, tmp_path))
    with pytest.raises(DataError, match="nope: not a Keel run dir"):
        run_lineage(data, document_versions(data, "a.jsonl", 5), tmp_path / "nope")


def test_after_removal_lineage_still_answers_for_the_run(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    run = copy_run(trained["a"], data, tmp_path)

    def lineage(ordinal: int) -> tuple[list[int], list[int], list[int]]:
        got = run_lineage(data, document_versions(data, "a.jsonl", ordinal), run)
        return got.steps, got.undone, got.checkpoints

    later = max(document_spans(data, load_manifest(data), "train"), key=lambda d: d.start).ordinal
    before = {ordinal: lineage(ordinal) for ordinal in (5, later)}
    assert before[5][0] and before[later][0]
    remove = ["data", "remove", str(data), "--source", "a.jsonl", "--ordinal"]
    assert CliRunner().invoke(app, [*remove, "5"]).exit_code == 0
    assert {ordinal: lineage(ordinal) for ordinal in (5, later)} == before  # the later document moved: mapped back
    result = CliRunner().invoke(
        app, ["data", "lineage", str(data), "--source", "a.jsonl", "--ordinal", "5", "--run", str(run)]
    )
    assert "removed from" in result.output and "the dataset before the removal of 20" in result.output
    assert CliRunner().invoke(app, [*remove, str(later), "--retrain-tokenizer"]).exit_code == 0
    assert lineage(5) == before[5] and lineage(later) == before[later]


@pytest.mark.soak
def test_lineage_follows_a_mixture_to_the_dataset_and_its_own_seed(trained):
    tmp, data = trained["tmp"], trained["data"]
    other = other_dataset(tmp, data)
    m = train(tmp, "m", data, 2, train={"steps": 12}, data={"mixture": {str(other): 1.0, str(data): 1.0}})
    got = run_lineage(data, document_versions(data, "a.jsonl", 5), m)
    both = [TokenDataset(other, "train"), TokenDataset(data, "train")]
    expected = steps_holding(loader(both, 2, [1.0, 1.0]), marker_tokens(data), {s: s - 1 for s in range(1, 13)})
    assert got.steps == expected and got.last == 12
    # The other dataset is dataset 0 of the mixture: its documents are read at the steps whose batch takes from it.
    mixed = loader(both, 2, [1.0, 1.0])
    takes = [s for s in range(1, 13) if any(mixed.locate((s - 1) * BATCH + i)[0] == 0 for i in range(BATCH))]
    assert run_lineage(other, document_versions(other, "o.jsonl"), m).steps == takes


@pytest.mark.soak
def test_after_removal_the_runs_resume_refuses_the_changed_dataset(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    run = copy_run(trained["a"], data, tmp_path)
    assert (
        CliRunner().invoke(app, ["data", "remove", str(data), "--source", "a.jsonl", "--ordinal", "5"]).exit_code == 0
    )
    resumed = run_keel("train", "--resume", str(run), "--set", "train.steps=35", cwd=tmp_path)
    assert_one_line_error(resumed, f"data.dataset {data} has changed since this run started")
