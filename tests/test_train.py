"""Training end to end through the `keel` command: data parallelism is exact, and resume is bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import losses, read_metrics, run_keel, tiny_config


def train(tmp_path, dataset, name, *extra, **sections):
    config = tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name, "seed": 0}, **sections)
    result = run_keel("train", str(config), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name


def test_two_process_ddp_and_fsdp_match_one_process(tmp_path, dataset):
    runs = [
        train(tmp_path, dataset, "single"),
        train(tmp_path, dataset, "ddp", "--nproc", "2", parallel={"dp_replicate": -1, "dp_shard": 1}),
        train(tmp_path, dataset, "fsdp", "--nproc", "2", parallel={"dp_shard": -1}),
        train_under_external_torchrun(tmp_path, dataset, "external"),
    ]
    single, ddp, fsdp, external = map(losses, runs)
    assert len(single) == len(ddp) == len(fsdp) == len(external) == 5
    for reference, *others in zip(single, ddp, fsdp, external, strict=True):
        assert others == pytest.approx([reference] * 3, rel=1e-5)
    assert single[-1] < single[0]
    # Per-group gradient norms: the same on every world size (FSDP adds up its shards), and they make the global one.
    groups = [{k: v for k, v in read_metrics(run)[0].items() if k.startswith("grad_norm/")} for run in runs]
    assert {"grad_norm/tok_embeddings", "grad_norm/layers.attention.wq", "grad_norm/output"} <= set(groups[0])
    for other in groups[1:]:
        assert other == pytest.approx(groups[0], rel=1e-4)
    total = sum(v * v for v in groups[0].values()) ** 0.5
    assert total == pytest.approx(read_metrics(runs[0])[0]["grad_norm"], rel=1e-5)


def train_under_external_torchrun(tmp_path, dataset, name):
    config = tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name, "seed": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "keel"]
    result = subprocess.run([*cmd, "train", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "runs" / name / "events.jsonl").read_text().splitlines()[0])["world_size"] == 2
    return tmp_path / "runs" / name


def test_gradient_accumulation_matches_one_big_batch(tmp_path, dataset):
    whole = losses(train(tmp_path, dataset, "whole"))
    accumulated = losses(train(tmp_path, dataset, "accum", train={"micro_batch_size": 2}))
    assert accumulated == pytest.approx(whole, rel=1e-5)


DOCUMENTS = {"document_positions": True, "document_mask": True}


@pytest.mark.parametrize(("nproc", "data"), [(1, {}), (2, {}), (1, DOCUMENTS)], ids=["1", "2", "documents"])
def test_resume_after_stop_reproduces_uninterrupted_losses_bit_for_bit(tmp_path, dataset, nproc, data):
    steps = {"steps": 20, "eval_every": 5}
    sections = {"checkpoint": {"every": 5}, "data": {"dataset": str(dataset), **data}}
    full = train(tmp_path, dataset, "full", "--nproc", str(nproc), train=steps, **sections)
    part = train(tmp_path, dataset, "part", "--nproc", str(nproc), train={**steps, "stop_after": 10}, **sections)
    assert [r["step"] for r in read_metrics(part) if "loss" in r] == list(range(1, 11))
    resumed = run_keel("train", "--resume", str(part), "--set", "train.stop_after=100", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert losses(part) == losses(full)
    val = [r["val_loss"] for r in read_metrics(full) if "val_loss" in r]
    assert [r["val_loss"] for r in read_metrics(part) if "val_loss" in r] == val
    events = [json.loads(line)["event"] for line in (part / "events.jsonl").read_text().splitlines()]
    assert "stop" in events and "resume" in events and events[-1] == "finish"
    if data.get("document_mask"):
        # Training under the document mask learns, and differs from plain packing from the first step on.
        assert losses(full)[-1] < losses(full)[0]
        assert losses(train(tmp_path, dataset, "plain", train={"steps": 1}))[0] != losses(full)[0]


def test_run_dir_holds_config_metrics_tensorboard_and_committed_checkpoint(tmp_path, dataset):
    run = train(tmp_path, dataset, "full-dir", train={"eval_every": 5}, observe={"tensorboard": True})
    assert (run / "config.toml").is_file() and (run / "tokenizer.json").is_file()
    assert (run / "checkpoints" / "step_5" / "commit.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "logs" / "rank0.log").is_file()
    last = read_metrics(run)[-1]
    for key in ("step", "time", "loss", "lr", "tokens_per_s", "val_loss", "mfu", "memory_rss_gb"):
        assert key in last
    sample = run_keel("generate", str(run), "--prompt", "the model", "--tokens", "8", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("the model") and len(sample.stdout.split()) > 2


def test_resume_of_a_finished_run_extends_it_with_more_steps(tmp_path, dataset):
    run = train(tmp_path, dataset, "extend", checkpoint={"every": 5})
    result = run_keel("train", "--resume", str(run), "--set", "train.steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


def test_resume_after_a_crash_mid_save_uses_the_previous_checkpoint_and_rewinds_metrics(tmp_path, dataset):
    steps = {"steps": 12}
    full = train(tmp_path, dataset, "ref", train=steps, checkpoint={"every": 4})
    run = train(tmp_path, dataset, "crash", train={**steps, "stop_after": 10}, checkpoint={"every": 4})
    # As if the process died while writing step 10's checkpoint: its shards exist, its commit record does not.
    (run / "checkpoints" / "step_10" / "commit.json").unlink()
    resumed = run_keel("train", "--resume", str(run), "--set", "train.stop_after=100", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step_8" in resumed.stdout
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert losses(run) == losses(full)
    rolled_back = (run / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in rolled_back] == [9, 10]


def test_metrics_rewind_moves_later_and_torn_lines_aside(tmp_path):
    from keel.observe.sinks import rewind_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.4}\n{"step": 4, "lo')
    assert rewind_jsonl(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()[1] == '{"step": 4, "lo'
