"""Preflight: what a worker would refuse is refused before anything is created, in one line; a worker's own
refusal still reaches `keel train`'s stderr as that one line; the data a run depends on is pinned by hash."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from conftest import assert_one_line_error, run_keel, synthetic_corpus, tiny_config
from keel.config_toml import load_config


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A dataset of the same corpus with another (smaller) tokenizer."""
    from keel.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("other")
    corpus = synthetic_corpus(root / "corpus", seed=1)
    out = root / "prepared"
    prepare_dataset([str(corpus / "*")], out, vocab_size=300, val_fraction=0.1, log=lambda msg: None)
    return out


def train_nproc2(tmp_path, dataset, *overrides, **sections):
    config = tiny_config(tmp_path / "c.toml", dataset, **sections)
    return run_keel("train", str(config), "--nproc", "2", *[f"--set={o}" for o in overrides], cwd=tmp_path)


def refused_before_anything(result, tmp_path, *fragments):
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "runs").exists(), "a refused command created a run dir"


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (['data.mixture={"/nonexistent/mix" = 1.0}'], ["data.mixture: dataset /nonexistent/mix does not exist"]),
        (["model.max_seq_len=4096", "train.seq_len=2048", "train.eval_every=1"], ["val split", "too few"]),
        (["checkpoint.init_from_hf='/nonexistent/hf'"], ["checkpoint.init_from_hf: /nonexistent/hf has no config"]),
        (["train.device=cuda"], ["train.device is 'cuda' but no CUDA device is visible"]),
    ],
    ids=["mixture-missing", "val-too-short", "init-from-hf-missing", "no-cuda"],
)
def test_what_a_worker_would_refuse_is_refused_before_any_process_or_file(tmp_path, dataset, overrides, fragments):
    if "train.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    refused_before_anything(train_nproc2(tmp_path, dataset, *overrides), tmp_path, *fragments)


def test_mixture_datasets_must_share_data_datasets_tokenizer_and_have_weights(tmp_path, dataset, other_tokenizer):
    mixture = f'data.mixture={{"{dataset}" = 1.0, "{other_tokenizer}" = 1.0}}'
    refused_before_anything(train_nproc2(tmp_path, dataset, mixture), tmp_path, "another tokenizer than data.dataset")
    zero = f'data.mixture={{"{dataset}" = 0.0}}'
    refused_before_anything(train_nproc2(tmp_path, dataset, zero), tmp_path, "data.mixture weights [0.0]")


def test_a_busy_prometheus_port_is_refused_before_any_process(tmp_path, dataset):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = train_nproc2(tmp_path, dataset, "observe.prometheus=true", f"observe.prometheus_port={port}")
    refused_before_anything(result, tmp_path, f"observe.prometheus_port: cannot listen on 127.0.0.1:{port}")


def test_a_refused_command_leaves_no_run_so_the_corrected_one_trains(tmp_path, dataset):
    bad = train_nproc2(tmp_path, dataset, 'data.mixture={"/nonexistent/mix" = 1.0}', train={"steps": 2})
    refused_before_anything(bad, tmp_path, "data.mixture")
    good = train_nproc2(tmp_path, dataset, train={"steps": 2})
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads((tmp_path / "runs" / "tiny" / "status.json").read_text())["state"] == "finished"


def test_a_workers_keel_error_is_the_commands_one_line_at_once_and_torchruns_report_goes_to_the_log(tmp_path, dataset):
    first = train_nproc2(tmp_path, dataset, train={"steps": 2})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "step 2/2" in first.stdout  # the workers' progress lines still reach the console
    run = tmp_path / "runs" / "tiny"
    # A corrupt checkpoint is found only by the workers, which verify it as they restore it.
    shard = sorted((run / "checkpoints" / "step_2").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    result = run_keel("train", "--resume", str(run), "--set", "train.steps=3", cwd=tmp_path)
    assert_one_line_error(result, "all 1 committed checkpoints fail verification", "keel checkpoint verify")
    launcher_log = (run / "logs" / "torchrun.log").read_text()
    # torchrun's report is in the log, once: a refusal is not restarted, where it would only be refused again.
    assert launcher_log.count("failed (exitcode: 2)") == 1


@pytest.mark.parametrize("damage", ["another", "garbage"])
def test_a_dataset_whose_tokenizer_is_not_the_manifests_is_refused(tmp_path, dataset, other_tokenizer, damage):
    copy = shutil.copytree(dataset, tmp_path / "data")
    if damage == "another":
        shutil.copyfile(other_tokenizer / "tokenizer.json", copy / "tokenizer.json")
    else:
        (copy / "tokenizer.json").write_text("{not a tokenizer")
    config = tiny_config(tmp_path / "c.toml", copy)
    result = run_keel("train", str(config), cwd=tmp_path)
    refused_before_anything(result, tmp_path, f"{copy}/tokenizer.json: does not match the dataset manifest")


def test_a_resume_refuses_a_swapped_tokenizer_in_the_dataset_or_the_run(tmp_path, dataset, other_tokenizer):
    copy = shutil.copytree(dataset, tmp_path / "data")
    config = tiny_config(tmp_path / "c.toml", copy, train={"steps": 1})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    resume = ["train", "--resume", str(run), "--set", "train.steps=2"]
    for swapped in (copy / "tokenizer.json", run / "tokenizer.json"):
        original = swapped.read_bytes()
        shutil.copyfile(other_tokenizer / "tokenizer.json", swapped)
        assert_one_line_error(run_keel(*resume, cwd=tmp_path), f"{swapped}: does not match the dataset manifest")
        swapped.write_bytes(original)
    assert run_keel(*resume, cwd=tmp_path).returncode == 0


def test_a_truncated_shard_is_refused_at_start(tmp_path, dataset):
    copy = shutil.copytree(dataset, tmp_path / "data")
    shard = copy / "train" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    result = run_keel("train", str(tiny_config(tmp_path / "c.toml", copy)), cwd=tmp_path)
    refused_before_anything(result, tmp_path, "train shard train/00000.bin has", "prepare the dataset again")


def mixture_run(tmp_path, dataset):
    """A run stopped after step 2 of 3, on a mixture of two copies of `dataset` given by relative paths."""
    work = tmp_path / "work"
    for name in ("a", "b"):
        shutil.copytree(dataset, work / name)
    config = tiny_config(
        work / "c.toml",
        "a",
        data={"mixture": {"a": 1.0, "b": 1.0}},
        train={"steps": 3, "stop_after": 2},
    )
    result = run_keel("train", str(config), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work, work / "runs" / "tiny"


def test_mixture_paths_are_recorded_absolute_and_hashed_so_a_resume_from_elsewhere_works(tmp_path, dataset):
    work, run = mixture_run(tmp_path, dataset)
    data = load_config(run / "config.toml").data
    assert list(data.mixture) == [str(work / "a"), str(work / "b")]
    assert set(data.mixture_sha256) == set(data.mixture) and all(len(h) == 64 for h in data.mixture_sha256.values())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_keel("train", "--resume", str(run), cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_a_resume_refuses_a_changed_mixture_dataset(tmp_path, dataset):
    work, run = mixture_run(tmp_path, dataset)
    manifest = work / "b" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "note": "prepared again"}))
    result = run_keel("train", "--resume", str(run), cwd=work)
    assert_one_line_error(result, f"data.mixture: dataset {work / 'b'} has changed since this run started")


def test_a_resume_refuses_a_model_change_its_checkpoints_cannot_load(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 1})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "config.toml").read_text()
    result = run_keel("train", "--resume", str(run), "--set", "model.dim=32", "--set", "train.steps=2", cwd=tmp_path)
    assert_one_line_error(result, "model.dim: the run's checkpoints hold a model with dim = 64, not 32")
    assert (run / "config.toml").read_text() == before


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_a_run_dir_that_cannot_be_written_is_refused_naming_it(tmp_path, dataset, where, request):
    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        run_dir, fragment = tmp_path / "file" / "run", "is a file, not a directory"
    else:
        run_dir, fragment = request.getfixturevalue("read_only_dir") / "run", "read-only file system"
    config = tiny_config(tmp_path / "c.toml", dataset, run={"name": "tiny", "dir": str(run_dir)})
    refused_before_anything(run_keel("train", str(config), cwd=tmp_path), tmp_path, f"run dir {run_dir}", fragment)
