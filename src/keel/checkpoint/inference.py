"""Load a trained model from a run dir into one process, whatever world size saved it (generate, export)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from keel.checkpoint.commit import committed_steps, read_commit, verify_files
from keel.checkpoint.safe_load import SafeLoadPlanner, safe_reader
from keel.config import Config
from keel.config_toml import load_config
from keel.errors import CheckpointError
from keel.models import model_args
from keel.rundir import RunDir


def checkpoint_path(run_dir: Path, step: int | None = None) -> Path:
    """The committed checkpoint of `run_dir` at `step` (newest when None)."""
    run = RunDir(run_dir).require(CheckpointError)
    steps = committed_steps(run.checkpoints)
    if not steps:
        raise CheckpointError(f"{run_dir}: no committed checkpoint under checkpoints/; train the run first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{run_dir}: no committed checkpoint at step {step}; committed steps: {steps}")
    return run.checkpoint(step)


def load_model(run_dir: Path, step: int | None = None, device: str = "cpu") -> tuple[nn.Module, Config]:
    """Build the run's model and load its weights from a verified, committed checkpoint."""
    path = checkpoint_path(run_dir, step)
    cfg = load_config(RunDir(run_dir).config)
    verify_files(path, read_commit(path))
    spec, args = model_args(cfg.model_section())
    with torch.device(device):
        model = spec.build(args)
    state = {"model": {"model": model.state_dict()}}
    with warnings.catch_warnings():
        # Loading without a process group is the point here (resharding to one process), not a mistake.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=safe_reader(path), planner=SafeLoadPlanner())
    model.load_state_dict(state["model"]["model"])
    model.eval()
    return model, cfg
