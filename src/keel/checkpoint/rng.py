"""Per-rank random number generator states, saved as tensors beside the DCP shards.

Each rank saves its own `rng/rank<r>.pt`. On the same world size every rank gets its own state
back. On a different world size the streams cannot map rank to rank, so every rank takes rank 0's
state: data-parallel ranks start from the same seed, so this is the state they would all share
without rank-dependent randomness. Keel's training step draws no random numbers (the sample order
is a function of the seed and the index), so the loss curve is unaffected either way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from keel.checkpoint.safety import load_tensors


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
