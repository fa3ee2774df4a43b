"""No code runs from data: crafted checkpoints and Hugging Face directories are refused before anything executes."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from keel.checkpoint.checkpointer import Checkpointer
from keel.checkpoint.commit import write_commit
from keel.checkpoint.hf import load_hf_weights
from keel.checkpoint.inference import load_model
from keel.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner
from keel.config_toml import build_config, save_config
from keel.distributed.env import DistEnv
from keel.errors import CheckpointError
from keel.models import model_args

TINY = {"name": "llama", "dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64, "max_seq_len": 16}


class Exploit:
    """Unpickling this runs a shell command that writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _quiet_dcp():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def saved_run(tmp_path):
    """A run dir holding a resolved config and one committed checkpoint of a tiny model (no training)."""
    run = tmp_path / "run"
    step_dir = run / "checkpoints" / "step_1"
    step_dir.mkdir(parents=True)
    save_config(build_config({"model": TINY, "run": {"dir": str(run)}}), run / "config.toml")
    spec, args = model_args(TINY)
    dcp.save({"model": {"model": spec.build(args).state_dict()}}, checkpoint_id=str(step_dir))
    write_commit(step_dir, step=1, world_size=1)
    return run, step_dir


def plant(file, marker):
    """Replace `file` with a pickle that would run code, and re-commit so only the safety check can catch it."""
    file.write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    step_dir = next(p for p in file.parents if p.name.startswith("step_"))
    write_commit(step_dir, step=int(step_dir.name[5:]), world_size=1)


def test_crafted_dcp_metadata_is_refused_by_load_model_and_never_runs(tmp_path):
    run, step_dir = saved_run(tmp_path)
    marker = tmp_path / "pwned"
    plant(step_dir / ".metadata", marker)
    with pytest.raises(CheckpointError) as caught:
        load_model(run)
    assert "refused to load" in str(caught.value) and "posix.system" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not marker.exists()
    # The same bytes, unpickled without restriction, do run code: the test's exploit is real.
    pickle.loads((step_dir / ".metadata").read_bytes())
    assert marker.exists()


class Scalar:
    """A Stateful holding one tensor, for driving the Checkpointer directly."""

    def __init__(self):
        self.value = torch.zeros(3)

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.mark.parametrize("target", [".metadata", "rng/rank0.pt"])
def test_checkpointer_restore_refuses_crafted_files_and_never_runs_them(tmp_path, target):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    checkpointer = Checkpointer(tmp_path / "checkpoints", env, keep=2)
    checkpointer.register("scalar", Scalar())
    path = checkpointer.save(1)
    marker = tmp_path / "pwned"
    plant(path / target, marker)
    with pytest.raises(CheckpointError, match="refused to load"):
        checkpointer.restore(path)
    assert not marker.exists()


def test_dcp_bytes_items_load_only_as_plain_data(tmp_path):
    marker = tmp_path / "pwned"
    dcp.save({"obj": Exploit(marker)}, checkpoint_id=str(tmp_path / "ckpt"))
    reader = SafeFileSystemReader(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointException) as caught:  # DCP wraps each rank's failure
        dcp.load({"obj": None}, storage_reader=reader, planner=SafeLoadPlanner())
    error = caught.value.failures[0][0]
    assert isinstance(error, CheckpointError) and "refused to load item obj" in str(error)
    assert "posix.system" in str(error)
    assert not marker.exists()


def test_hf_directory_with_only_pickled_weights_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    spec, args = model_args(TINY)
    model = spec.build(args)
    (tmp_path / "config.json").write_text(json.dumps(spec.hf.config(args)))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_hf_weights(model, spec, args, tmp_path)
    assert not marker.exists()
