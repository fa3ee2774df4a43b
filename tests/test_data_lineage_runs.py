"""`keel data lineage --run`: which steps of real runs read a document, and which checkpoints have seen it since."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, quiet, run_keel, tiny_config
from keel.checkpoint.commit import committed_steps
from keel.data.dataset import TokenDataset
from keel.data.lineage import find_documents
from keel.data.loader import BatchLoader
from keel.data.prepare import prepare_dataset
from keel.data.versions import document_versions
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
    checkpoint = {"every": 5, "keep": 3}
    config = tiny_config(
        tmp / f"{name}.toml", dataset, run={"name": name, "seed": seed}, checkpoint=checkpoint, **sections
    )
    result = run_keel("train", str(config), cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / name


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A dataset and another with its tokenizer; run a (seed 0, a loss spike rolls steps 21-23 back), run b (seed 1),
    and run m, a mixture of both datasets (seed 2)."""
    tmp = tmp_path_factory.mktemp("lineage")
    settings = {"val_fraction": 0.2, "log": quiet}
    data = tmp / "data"
    prepare_dataset([str(corpus(tmp / "a.jsonl", 2, True))], data, vocab_size=400, **settings)
    other = tmp / "other"
    tokenizer = str(data / "tokenizer.json")
    prepare_dataset([str(corpus(tmp / "o.jsonl", 3, False))], other, tokenizer=tokenizer, **settings)
    spike = {"inject": "spike:step=23", "spike_window": 10}
    return {
        "tmp": tmp,
        "data": data,
        "other": other,
        "a": train(tmp, "a", data, 0, train={"steps": 30}, resilience=spike),
        "b": train(tmp, "b", data, 1, train={"steps": 30}),
        "m": train(tmp, "m", data, 2, train={"steps": 12}, data={"mixture": {str(other): 1.0, str(data): 1.0}}),
    }


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
    data = trained["data"]
    tokens, versions = marker_tokens(data), document_versions(data, "a.jsonl", 5)
    train_split = [TokenDataset(data, "train")]
    # Run a rolled back from step 23 to its step-20 checkpoint and skipped batches 20-22: step s > 20 reads s + 2.
    reads = {"a": {s: s - 1 if s <= 20 else s + 2 for s in range(1, 31)}, "b": {s: s - 1 for s in range(1, 31)}}
    found = {}
    for name, seed in (("a", 0), ("b", 1)):
        got = run_lineage(data, versions, trained[name])
        expected = steps_holding(loader(train_split, seed), tokens, reads[name])
        assert got.steps == expected and expected and got.last == 30
        assert got.checkpoints == [c for c in committed_steps(trained[name] / "checkpoints") if c >= expected[0]]
        found[name] = expected
    assert found["a"] != found["b"]  # another seed, another order
    undone = run_lineage(data, versions, trained["a"]).undone
    assert undone == steps_holding(loader(train_split, 0), tokens, {21: 20, 22: 21, 23: 22})
    result = run_keel(
        "data",
        "lineage",
        str(data),
        "--source",
        "a.jsonl",
        "--ordinal",
        "5",
        "--run",
        str(trained["a"]),
        "--run",
        str(trained["b"]),
        cwd=trained["tmp"],
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train document 5: tokens" in out and f"run {trained['b']} (seed 1, 30 steps, the dataset now):" in out
    assert f"run {trained['a']}: committed checkpoints that have seen it: step_20, step_25, step_30" in out


def test_lineage_follows_a_mixture_to_the_dataset_and_its_own_seed(trained):
    data, other = trained["data"], trained["other"]
    got = run_lineage(data, document_versions(data, "a.jsonl", 5), trained["m"])
    both = [TokenDataset(other, "train"), TokenDataset(data, "train")]
    expected = steps_holding(loader(both, 2, [1.0, 1.0]), marker_tokens(data), {s: s - 1 for s in range(1, 13)})
    assert got.steps == expected and got.last == 12
    # The other dataset is dataset 0 of the mixture: its documents are read at the steps whose batch takes from it.
    mixed = loader(both, 2, [1.0, 1.0])
    takes = [s for s in range(1, 13) if any(mixed.locate((s - 1) * BATCH + i)[0] == 0 for i in range(BATCH))]
    assert run_lineage(other, document_versions(other, "o.jsonl"), trained["m"]).steps == takes


def test_lineage_for_a_run_trained_on_another_dataset_is_one_line_naming_it(trained):
    result = run_keel(
        "data", "lineage", str(trained["other"]), "--source", "o.jsonl", "--run", str(trained["a"]), cwd=trained["tmp"]
    )
    assert_one_line_error(result, f"run {trained['a']} was trained on another dataset ({trained['data']}", "pass")
    nothing = run_keel(
        "data", "lineage", str(trained["data"]), "--source", "a.jsonl", "--run", "nope", cwd=trained["tmp"]
    )
    assert_one_line_error(nothing, "nope: not a Keel run dir")


def test_after_removal_lineage_still_answers_for_the_runs_and_their_resume_refuses(trained, tmp_path):
    # A copy of the dataset and of run b, pointed at each other, to remove from.
    data, run = tmp_path / "data", tmp_path / "runs" / "b"
    shutil.copytree(trained["data"], data)
    shutil.copytree(trained["b"], run)
    config = (run / "config.toml").read_text()
    config = config.replace(f'"{trained["data"]}"', f'"{data}"').replace(f'"{trained["b"]}"', f'"{run}"')
    (run / "config.toml").write_text(config)

    def lineage(ordinal: int) -> tuple[list[int], list[int]]:
        got = run_lineage(data, document_versions(data, "a.jsonl", ordinal), run)
        return got.steps, got.checkpoints

    before = {ordinal: lineage(ordinal) for ordinal in (5, 30)}
    assert before[5][0] and before[30][0] and find_documents(data, "a.jsonl", 30)[0].split == "train"
    remove = ("data", "remove", str(data), "--source", "a.jsonl", "--ordinal")
    assert run_keel(*remove, "5", cwd=tmp_path).returncode == 0
    assert {ordinal: lineage(ordinal) for ordinal in (5, 30)} == before  # document 30 moved: mapped back
    result = run_keel(
        "data", "lineage", str(data), "--source", "a.jsonl", "--ordinal", "5", "--run", str(run), cwd=tmp_path
    )
    assert "removed from" in result.stdout and "committed checkpoints that have seen it" in result.stdout
    assert run_keel(*remove, "30", "--retrain-tokenizer", cwd=tmp_path).returncode == 0
    assert lineage(5) == before[5] and lineage(30) == before[30]
    resumed = run_keel("train", "--resume", str(run), "--set", "train.steps=35", cwd=tmp_path)
    assert_one_line_error(resumed, f"data.dataset {data} has changed since this run started")
