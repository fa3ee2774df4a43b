"""Save with N processes, resume with M (DDP and FSDP): the resumed run continues the uninterrupted loss curve."""

from __future__ import annotations

import json

import pytest

from conftest import losses, read_metrics, run_keel, tiny_config

STEPS = 8


def reference(tmp_path, dataset, monkeypatch):
    # One thread per process: on a shared 2-core machine, oversubscribed threads make a tiny step 10x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tiny_config(tmp_path / "ref.toml", dataset, run={"name": "ref", "seed": 0}, train={"steps": STEPS})
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses(tmp_path / "runs" / "ref")


def chain(tmp_path, dataset, legs: list[tuple[int, str, int]]):
    """Train `legs` of (processes, dp, stop_after) one after another, each resuming the previous one's checkpoint."""
    config = tiny_config(
        tmp_path / "chain.toml",
        dataset,
        run={"name": "chain", "seed": 0},
        train={"steps": STEPS},
        checkpoint={"every": 0, "async_save": True},
    )
    run = tmp_path / "runs" / "chain"
    for i, (nproc, dp, stop_after) in enumerate(legs):
        first = ["train", str(config)] if i == 0 else ["train", "--resume", str(run)]
        result = run_keel(
            *first,
            "--nproc",
            str(nproc),
            *DP[dp],
            "--set",
            f"train.stop_after={stop_after}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return run


DP = {  # the data-parallel style as mesh settings
    "ddp": ["--set", "parallel.dp_replicate=-1", "--set", "parallel.dp_shard=1"],
    "fsdp": ["--set", "parallel.dp_replicate=1", "--set", "parallel.dp_shard=-1"],
}


def assert_continues(run, ref, legs):
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(ref, rel=1e-5)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    resumes = [(e["step"], e["world_size"]) for e in events if e["event"] == "resume"]
    assert resumes == [(stop, nproc) for (_, _, stop), (nproc, _, _) in zip(legs, legs[1:], strict=False)]
    # The data position travels in global batches, so every world size continues at the same sample.
    assert events[-1]["event"] == "finish" and events[-1]["tokens_seen"] == STEPS * 8 * 32


def test_resume_on_another_process_count_and_from_ddp_to_fsdp_continues_the_loss_curve(tmp_path, dataset, monkeypatch):
    ref = reference(tmp_path, dataset, monkeypatch)
    legs = [(2, "ddp", 4), (1, "fsdp", STEPS)]
    assert_continues(chain(tmp_path, dataset, legs), ref, legs)


@pytest.mark.soak
def test_resume_across_one_two_and_four_processes_and_back_and_forth_between_ddp_and_fsdp(
    tmp_path, dataset, monkeypatch
):
    ref = reference(tmp_path, dataset, monkeypatch)
    legs = [(4, "ddp", 2), (2, "fsdp", 4), (1, "ddp", 6), (4, "fsdp", STEPS)]
    assert_continues(chain(tmp_path, dataset, legs), ref, legs)
