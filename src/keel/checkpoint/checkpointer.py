"""Save and restore everything that shapes the future; a checkpoint exists only once its commit record does."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp

from keel.checkpoint.commit import COMMIT_FILE, committed_steps, read_commit, verify_files, write_commit
from keel.checkpoint.scalars import from_tensors, to_tensors
from keel.distributed.env import DistEnv, all_agree, barrier
from keel.errors import CheckpointError


class Stateful(Protocol):
    """Anything whose state goes into a checkpoint: tensors, ints, floats and bools, nested in dicts."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step`."""
    return f"step_{step}"


class Checkpointer:
    """Writes `RUN_DIR/checkpoints/step_<N>/` with DCP shards, per-rank RNG states and a commit record."""

    def __init__(self, root: Path, env: DistEnv, keep: int, on_event: Callable[..., None] | None = None):
        self.root = Path(root)
        self.env = env
        self.keep = keep
        self._on_event = on_event or (lambda kind, **fields: None)
        self._objects: dict[str, Stateful] = {}

    def register(self, name: str, obj: Stateful) -> None:
        """Include `obj` in every checkpoint under `name`; any capability can register itself."""
        if name in self._objects:
            raise ValueError(f"a stateful object named {name!r} is already registered")
        self._objects[name] = obj

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        steps = committed_steps(self.root)
        return self.root / step_dir_name(steps[-1]) if steps else None

    def save(self, step: int) -> Path:
        """Write a checkpoint of every registered object after `step` and commit it (a collective call)."""
        if not self._objects:
            raise ValueError("nothing is registered with the Checkpointer")
        path = self.root / step_dir_name(step)
        started = time.perf_counter()
        if self.env.is_main:
            # A directory without a commit record is the remains of a crashed save: never trusted, safe to replace.
            if path.exists():
                shutil.rmtree(path)
            (path / "rng").mkdir(parents=True)
        barrier()
        torch.save(_rng_state(), path / "rng" / f"rank{self.env.rank}.pt")
        state = {name: to_tensors(obj.state_dict()) for name, obj in self._objects.items()}
        dcp.save(state, checkpoint_id=str(path))
        barrier()
        if self.env.is_main:
            write_commit(path, step=step, world_size=self.env.world_size)
            self._apply_retention()
        barrier()
        self._on_event("checkpoint", step=step, path=str(path), seconds=round(time.perf_counter() - started, 3))
        return path

    def restore(self, path: Path) -> int:
        """Load every registered object from the committed checkpoint at `path`; returns its step."""
        ok = True
        try:
            record = read_commit(path)
            if self.env.is_main:
                verify_files(path, record)
        except CheckpointError as e:
            ok, error = False, e
        if not all_agree(ok):
            raise error if not ok else CheckpointError(f"{path}: checkpoint failed verification on another rank")
        templates = {name: to_tensors(obj.state_dict()) for name, obj in self._objects.items()}
        try:
            dcp.load(templates, checkpoint_id=str(path))
        except Exception as e:  # DCP raises a CheckpointException wrapping per-rank failures
            raise CheckpointError(
                f"{path}: cannot load into this model and optimizer ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "was it saved with another model config?"
            ) from None
        for name, obj in self._objects.items():
            obj.load_state_dict(from_tensors(templates[name], obj.state_dict()))
        rng_file = path / "rng" / f"rank{self.env.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        return int(record["step"])

    def _apply_retention(self) -> None:
        steps = committed_steps(self.root)
        for old in steps[: -self.keep]:
            shutil.rmtree(self.root / step_dir_name(old), ignore_errors=True)
        newest = steps[-1]
        for stale in self.root.glob("step_*"):
            uncommitted = not (stale / COMMIT_FILE).exists()
            if uncommitted and stale.name.removeprefix("step_").isdigit() and int(stale.name[5:]) < newest:
                shutil.rmtree(stale, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
