"""The Checkpointer in one process: async commits, verification with fallback, retention, disk full, RNG, verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from keel.checkpoint.checkpointer import Checkpointer, steps_to_delete
from keel.checkpoint.commit import committed_steps, read_commit, verify_files
from keel.checkpoint.state import ModelOptimizerState, load_rng, save_rng
from keel.cli import main as keel_main
from keel.config_toml import load_config
from keel.distributed.env import DistEnv
from keel.errors import CheckpointError, ConfigError

ALONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Counter:
    """A registered capability with scalar state, as a later one (guard, goodput ledger) would be."""

    def __init__(self) -> None:
        self.step, self.loss = 0, 0.0

    def state_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss = state["step"], state["loss"]


def make(root, keep=3, keep_every=0, width=64):
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counter = Counter()
    events = []
    ckpt = Checkpointer(root, ALONE, keep, on_event=lambda kind, **f: events.append((kind, f)), keep_every=keep_every)
    ckpt.register("model", ModelOptimizerState(model, optimizer))
    ckpt.register("counter", counter)
    return ckpt, model, optimizer, counter, events


def step(model, optimizer, counter):
    model(torch.randn(4, model.in_features)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    counter.step += 1
    counter.loss = float(counter.step) / 3


def test_async_save_without_a_process_group_commits_the_state_of_its_step(tmp_path):
    ckpt, model, optimizer, counter, events = make(tmp_path)
    step(model, optimizer, counter)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    path = ckpt.save_async(1)
    for _ in range(3):  # training goes on while the save is written; the staged copy must not see it
        step(model, optimizer, counter)
    ckpt.wait()
    assert committed_steps(tmp_path) == [1]
    verify_files(path, read_commit(path))
    assert [kind for kind, _ in events] == ["checkpoint"]
    fresh, fresh_model, _, fresh_counter, _ = make(tmp_path)
    assert fresh.restore_latest() == (path, 1)
    assert all(torch.equal(fresh_model.state_dict()[k], v) for k, v in saved.items())
    assert (fresh_counter.step, fresh_counter.loss) == (1, 1 / 3)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_is_loaded(tmp_path, damage):
    ckpt, model, optimizer, counter, _ = make(tmp_path)
    for s in (1, 2):
        step(model, optimizer, counter)
        ckpt.save(s)
    shard = next((tmp_path / "step_2").glob("*.distcp"))
    data = shard.read_bytes()
    if damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:
        shard.unlink()
    fresh, _, _, fresh_counter, events = make(tmp_path)
    path, restored = fresh.restore_latest()
    assert (restored, fresh_counter.step, path.name) == (1, 1, "step_1")
    assert [(kind, f["step"]) for kind, f in events] == [("checkpoint_corrupt", 2)]
    assert shard.name in events[0][1]["error"]


def test_no_intact_checkpoint_left_is_a_one_line_checkpoint_error(tmp_path):
    ckpt, model, optimizer, counter, _ = make(tmp_path)
    step(model, optimizer, counter)
    ckpt.save(1)
    next((tmp_path / "step_1").glob("*.distcp")).write_bytes(b"garbage")
    fresh, *_ = make(tmp_path)
    with pytest.raises(CheckpointError, match="all 1 committed checkpoints fail verification") as e:
        fresh.restore_latest()
    assert "\n" not in str(e.value) and "keel checkpoint verify" in str(e.value)


def test_retention_keeps_the_last_k_every_mth_step_and_always_the_newest(tmp_path):
    assert steps_to_delete([2, 4, 6, 8, 10, 12], keep=2, keep_every=4) == [2, 6]
    assert steps_to_delete([5], keep=1) == []
    ckpt, model, optimizer, counter, _ = make(tmp_path, keep=2, keep_every=4)
    for s in range(1, 11):
        step(model, optimizer, counter)
        (ckpt.save_async if s % 2 else ckpt.save)(s)
    ckpt.wait()
    assert committed_steps(tmp_path) == [4, 8, 9, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_4", "step_8", "step_9"]


def test_rng_states_return_per_rank_and_rank_0_on_a_new_world_size(tmp_path):
    (tmp_path / "rng").mkdir()
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        states.append(torch.get_rng_state())
        save_rng(tmp_path, rank)
    load_rng(tmp_path, 1, saved_world_size=2, world_size=2)
    assert torch.equal(torch.get_rng_state(), states[1])
    load_rng(tmp_path, 3, saved_world_size=2, world_size=4)
    assert torch.equal(torch.get_rng_state(), states[0])


def mount_tmpfs(where, size: str) -> bool:
    where.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, mode):
    root = tmp_path / "ckpt"
    if not mount_tmpfs(root, "3m"):
        pytest.skip("mounting a tmpfs needs root; the file-size-limit test covers EFBIG without it")
    try:
        ckpt, model, optimizer, counter, _ = make(root, width=400)  # ~1.9 MB per checkpoint: two do not fit
        step(model, optimizer, counter)
        ckpt.save(1)
        step(model, optimizer, counter)
        with pytest.raises(CheckpointError) as e:
            if mode == "sync":
                ckpt.save(2)
            else:
                ckpt.save_async(2)
                ckpt.wait()
        message = str(e.value)
        assert "no space left on device" in message and "step_1 is kept" in message and "\n" not in message
        assert committed_steps(root) == [1] and not (root / "step_2").exists()
        verify_files(root / "step_1", read_commit(root / "step_1"))
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_keel_checkpoint_verify_prints_a_line_per_checkpoint_and_exits_2_on_a_corrupt_one(tmp_path, capsys):
    ckpt, model, optimizer, counter, _ = make(tmp_path / "run" / "checkpoints")
    for s in (1, 2):
        step(model, optimizer, counter)
        ckpt.save(s)
    (tmp_path / "run" / "checkpoints" / "step_3").mkdir()  # remains of an interrupted save
    with pytest.raises(SystemExit) as done:
        keel_main(["checkpoint", "verify", str(tmp_path / "run")])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["step_1: ok", "step_2: ok", "step_3: uncommitted"]
    (tmp_path / "run" / "checkpoints" / "step_1" / "rng" / "rank0.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as done:
        keel_main(["checkpoint", "verify", str(tmp_path / "run")])
    assert done.value.code == 2
    assert capsys.readouterr().out.splitlines()[0].startswith("step_1: CORRUPT: ")


def test_verify_of_a_dir_without_checkpoints_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keel", "checkpoint", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"keel: error: {tmp_path}: no checkpoints under checkpoints/; "
        "is it a Keel run dir that has saved?"
    )


@pytest.mark.parametrize("override", ["checkpoint.keep_every=-1", "checkpoint.async_save=maybe"])
def test_bad_checkpoint_keys_are_config_errors_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_commit_record_names_every_file_with_size_and_checksum(tmp_path):
    ckpt, model, optimizer, counter, _ = make(tmp_path)
    step(model, optimizer, counter)
    ckpt.save(1)
    record = json.loads((tmp_path / "step_1" / "commit.json").read_text())
    assert record["step"] == 1 and {".metadata", "rng/rank0.pt"} <= set(record["files"])
    assert any(name.endswith(".distcp") for name in record["files"])
    assert all(len(meta["sha256"]) == 64 and meta["bytes"] > 0 for meta in record["files"].values())


EFBIG_CHILD = """
import resource, signal, sys
import torch
sys.path.insert(0, sys.argv[2])
from test_checkpoint import make, step
from keel.errors import CheckpointError
ckpt, model, optimizer, counter, _ = make(sys.argv[1], width=400)
ckpt.save(0)
step(model, optimizer, counter)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the kernel's limit surfaces as EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))  # now the 1.9 MB shard cannot be written
try:
    ckpt.save(1)
except CheckpointError as e:
    print(e)
"""


def test_file_size_limit_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", EFBIG_CHILD, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert "cannot save step 1: file too large" in message and "step_0 is kept" in message, message
    assert committed_steps(tmp_path) == [0] and not (tmp_path / "step_1").exists()
    verify_files(tmp_path / "step_0", read_commit(tmp_path / "step_0"))
