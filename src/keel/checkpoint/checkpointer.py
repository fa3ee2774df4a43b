"""Save and restore everything that shapes the future; a checkpoint exists only once its commit record does."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from keel.checkpoint.async_save import InFlightSave
from keel.checkpoint.commit import (
    checkpoint_dirs,
    committed_steps,
    read_commit,
    remove_checkpoint,
    verify_files,
    write_commit,
)
from keel.checkpoint.safe_load import SafeLoadPlanner, read_metadata, safe_reader
from keel.checkpoint.state import from_tensors, load_rng, save_rng, to_tensors
from keel.distributed.env import DistEnv, all_agree, barrier
from keel.errors import CheckpointError
from keel.io import FULL_DISK, first_line
from keel.rundir import checkpoint_name

log = logging.getLogger("keel")


class Stateful(Protocol):
    """Anything whose state goes into a checkpoint: tensors, ints, floats and bools, nested in dicts."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# DCP warns when it runs without a process group; one process is a supported case here, and async
# saves write from DCP's own thread, where a scoped catch_warnings would not reach.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Checkpointer:
    """Writes `RUN_DIR/checkpoints/step_<N>/` with DCP shards, per-rank RNG states and a commit record."""

    def __init__(
        self,
        root: Path,
        env: DistEnv,
        keep: int,
        on_event: Callable[..., None] | None = None,
        keep_every: int = 0,
    ):
        self.root = Path(root)
        self.env = env
        self.keep, self.keep_every = keep, keep_every
        self._on_event = on_event or (lambda kind, **fields: None)
        self._objects: dict[str, Stateful] = {}
        self._optional: set[str] = set()
        self._in_flight: InFlightSave | None = None
        self._async_group: dist.ProcessGroup | None = None

    def register(self, name: str, obj: Stateful, optional: bool = False) -> None:
        """Include `obj` in every checkpoint under `name`; any capability can register itself.

        An optional object keeps its current state when a checkpoint (from an older Keel) lacks it.
        """
        if name in self._objects:
            raise ValueError(f"a stateful object named {name!r} is already registered")
        self._objects[name] = obj
        if optional:
            self._optional.add(name)

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None."""
        steps = committed_steps(self.root)
        return self.root / checkpoint_name(steps[-1]) if steps else None

    def save(self, step: int) -> Path:
        """Write a checkpoint of every registered object after `step` and commit it (a collective call)."""
        self.wait()
        path, started, previous = self._begin(step)
        try:
            dcp.save(self._state(), checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:
            raise self._failed(e, path, step, previous) from None
        barrier()
        if self.env.is_main:
            self._commit(path, step, started, time.perf_counter() - started)
        barrier()
        return path

    def save_async(self, step: int) -> Path:
        """Stage a checkpoint after `step` and return while it is written; it is committed once every rank is done.

        Only one save is in flight: a new save (and `wait`) first waits for the previous one.
        """
        self.wait()
        path, started, previous = self._begin(step)
        if dist.is_initialized() and self._async_group is None:
            # Its own group: async collectives on the training group hang or mismatch (docs/torch-on-cpu.md).
            self._async_group = dist.new_group(backend="gloo")
        try:
            response = dcp.async_save(self._state(), checkpoint_id=str(path), process_group=self._async_group)
        except (Exception, CheckpointException) as e:
            raise self._failed(e, path, step, previous) from None
        blocked = time.perf_counter() - started
        upload = getattr(response, "upload_completion", response)  # newer torch returns an AsyncSaveResponse

        def commit() -> None:
            if self.env.is_main:
                self._commit(path, step, started, blocked)

        self._in_flight = InFlightSave(
            step, upload, self._async_group, commit, lambda e: self._failed(e, path, step, previous)
        )
        return path

    def wait(self) -> None:
        """Wait for the save in flight, if any, to be committed; raise its CheckpointError if it failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.wait()

    def restore(self, path: Path) -> int:
        """Load every registered object from the committed checkpoint at `path` after verifying it; returns its step."""
        problem = self._verify(path)
        if problem is not None:
            raise CheckpointError(problem)
        return self._load(path)

    def restore_latest(self) -> tuple[Path, int] | None:
        """Load the newest committed checkpoint that verifies, reporting and skipping corrupt ones; None if none."""
        steps = committed_steps(self.root)
        for step in reversed(steps):
            path = self.root / checkpoint_name(step)
            problem = self._verify(path)
            if problem is None:
                return path, self._load(path)
            self._on_event("checkpoint_corrupt", step=step, path=str(path), error=problem)
            log.warning(f"skipping corrupt checkpoint: {problem}")
        if steps:
            raise CheckpointError(
                f"{self.root}: all {len(steps)} committed checkpoints fail verification (see `keel checkpoint verify "
                f"{self.root.parent}`); restore their files or start a new run"
            )
        return None

    def _begin(self, step: int) -> tuple[Path, float, Path | None]:
        if not self._objects:
            raise ValueError("nothing is registered with the Checkpointer")
        path = self.root / checkpoint_name(step)
        started = time.perf_counter()
        previous = self.latest()
        try:
            if self.env.is_main:
                # A directory without a commit record is the remains of a crashed save: never trusted, safe to replace.
                if path.exists():
                    shutil.rmtree(path)
                (path / "rng").mkdir(parents=True)
            barrier()
            save_rng(path, self.env.rank)
        except OSError as e:
            raise self._failed(e, path, step, previous) from None
        return path, started, previous

    def _state(self) -> dict[str, Any]:
        return {name: to_tensors(obj.state_dict()) for name, obj in self._objects.items()}

    def _failed(self, exc: BaseException, path: Path, step: int, previous: Path | None) -> CheckpointError:
        if self.env.is_main:
            shutil.rmtree(path, ignore_errors=True)  # uncommitted, so never loaded; removing it frees the space
        return save_failed(exc, path, step, previous)

    def _commit(self, path: Path, step: int, started: float, blocked_s: float) -> None:
        record = write_commit(path, step=step, world_size=self.env.world_size)
        self._apply_retention()
        size = sum(f["bytes"] for f in record["files"].values())
        seconds = round(time.perf_counter() - started, 3)
        self._on_event(
            "checkpoint", step=step, path=str(path), seconds=seconds, blocked_s=round(blocked_s, 3), bytes=size
        )

    def _verify(self, path: Path) -> str | None:
        """None when the checkpoint at `path` verifies on every rank, else what is wrong (checksums on rank 0)."""
        problem = None
        try:
            record = read_commit(path)
            if self.env.is_main:
                verify_files(path, record)
        except CheckpointError as e:
            problem = str(e)
        if all_agree(problem is None):
            return None
        return problem or f"{path}: checkpoint failed verification on another rank"

    def _load(self, path: Path) -> int:
        record = read_commit(path)
        reader = safe_reader(path)  # refuses metadata that would unpickle anything but DCP's own classes
        saved = {key.split(".", 1)[0] for key in read_metadata(path).state_dict_metadata}
        absent = {name for name in self._optional if name not in saved}
        templates = {name: state for name, state in self._state().items() if name not in absent}
        try:
            dcp.load(templates, storage_reader=reader, planner=SafeLoadPlanner())
        except (Exception, CheckpointException) as e:
            raise CheckpointError(
                f"{path}: cannot load into this model and optimizer ({first_line(e)}); "
                "was it saved with another model config?"
            ) from None
        for name, obj in self._objects.items():
            if name not in absent:
                obj.load_state_dict(from_tensors(templates[name], obj.state_dict()))
        load_rng(path, self.env.rank, int(record.get("world_size", self.env.world_size)), self.env.world_size)
        return int(record["step"])

    def _apply_retention(self) -> None:
        steps = committed_steps(self.root)
        for old in steps_to_delete(steps, self.keep, self.keep_every):
            remove_checkpoint(self.root / checkpoint_name(old))
        for step, stale in checkpoint_dirs(self.root):
            if step < steps[-1] and step not in steps:  # the remains of a crashed save, older than the newest commit
                shutil.rmtree(stale, ignore_errors=True)


def steps_to_delete(committed: list[int], keep: int, keep_every: int = 0) -> list[int]:
    """Committed steps (oldest first) that retention removes: all but the last K and every M-th; never the newest."""
    if not committed:
        return []
    kept = set(sorted(committed)[-max(keep, 1) :])
    if keep_every:
        kept |= {s for s in committed if s % keep_every == 0}
    return [s for s in sorted(committed) if s not in kept]


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and contexts, and the per-rank failures DCP wraps (it raises their summary)."""
    seen, stack, found = set(), [exc], []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found.append(e)
        stack += [e.__cause__, e.__context__]
        for wrapped in getattr(e, "failures", {}).values():
            stack.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
    return found


def save_failed(exc: BaseException, path: Path, step: int, previous: Path | None) -> CheckpointError:
    """The one-line CheckpointError for a save of `step` into `path` that raised `exc`: a full disk is named."""
    kept = f"the previous checkpoint {previous.name} is kept" if previous else "no earlier checkpoint exists"
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in FULL_DISK:
            return CheckpointError(
                f"{path}: cannot save step {step}: {FULL_DISK[e.errno]}; {kept}; free space under {path.parent} "
                "or lower checkpoint.keep"
            )
    return CheckpointError(f"{path}: saving step {step} failed ({first_line(exc)}); {kept}")
