"""What a checkpoint holds besides the capabilities' own state: model and optimizer, RNG states, plain scalars.

Python scalars travel as 0-d tensors, so DCP never pickles anything (invariant 7).

Each rank saves its own RNG state as `rng/rank<r>.pt`. On the same world size every rank gets its own
state back. On a different world size the streams cannot map rank to rank, so every rank takes rank 0's:
data-parallel ranks start from the same seed, so this is the state they would all share without
rank-dependent randomness. Keel's training step draws no random numbers (the sample order is a function
of the seed and the index), so the loss curve is unaffected either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
from torch.optim import Optimizer

from keel.checkpoint.safe_load import load_tensors

_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}


def to_tensors(state: Any) -> Any:
    """Copy a nested state dict with every bool, int and float leaf turned into a 0-d tensor."""
    if isinstance(state, dict):
        return {k: to_tensors(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return state
    if type(state) in _DTYPES:
        return torch.tensor(state, dtype=_DTYPES[type(state)])
    raise TypeError(f"checkpoint state may hold tensors, bools, ints and floats, not {type(state).__name__}")


def from_tensors(loaded: Any, like: Any) -> Any:
    """Turn the tensor leaves of `loaded` back into Python scalars wherever `like` holds a scalar."""
    if isinstance(like, dict):
        return {k: from_tensors(loaded[k], v) for k, v in like.items()}
    if isinstance(like, torch.Tensor):
        return loaded
    return type(like)(loaded.item())


def rng_file(path: Path, rank: int) -> Path:
    """Where rank `rank` keeps its RNG state in the checkpoint at `path`."""
    return path / "rng" / f"rank{rank}.pt"


def save_rng(path: Path, rank: int) -> None:
    """Write this rank's CPU (and CUDA, if used) generator states."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, rng_file(path, rank))


def load_rng(path: Path, rank: int, saved_world_size: int, world_size: int) -> None:
    """Restore this rank's generator states (rank 0's when the world size changed); missing files are skipped."""
    source = rng_file(path, rank if saved_world_size == world_size else 0)
    if not source.exists():
        return
    state = load_tensors(source)  # weights_only, and a crafted file becomes a one-line CheckpointError
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ModelOptimizerState:
    """State of the model weights and the optimizer's per-parameter tensors, keyed by parameter name.

    Only the optimizer's tensors are saved: its hyper-parameters come from the config and the
    schedule, so a resumed run may change them deliberately, and nothing non-tensor needs pickling.
    The form is sharding-independent, so DCP reshards it on load.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """{"model": weights, "optim": optimizer tensors}, full names, DTensor shards under FSDP."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state["state"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights and optimizer tensors, keeping the current hyper-parameters."""
        param_groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": param_groups},
        )
