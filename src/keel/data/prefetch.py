"""Background loading: torchdata's StatefulDataLoader computes the next global batches in worker processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from keel.data.loader import Batch, BatchLoader


class _GlobalBatches(torch.utils.data.Dataset):
    """Item b is this rank's micro batches of global batch b."""

    def __init__(self, loader: BatchLoader):
        self.loader = loader

    def __getitem__(self, position: int) -> list[Batch]:
        return self.loader.batch_at(position)


class _From(torch.utils.data.Sampler):
    """Global batch positions start, start + 1, ... without end (training decides when to stop)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield position
            position += 1


class PrefetchLoader:
    """BatchLoader's interface, with batches read ahead by worker processes.

    The checkpointed state stays BatchLoader's position (one int): the order is a pure function of it, so a
    resume on any world size restarts the workers at that position instead of restoring per-worker state.
    """

    def __init__(self, loader: BatchLoader, num_workers: int, prefetch_factor: int):
        self.loader, self.num_workers, self.prefetch_factor = loader, num_workers, prefetch_factor
        self._batches: Iterator[list[Batch]] | None = None

    def next_batch(self) -> list[Batch]:
        """The next global batch's micro batches for this rank, usually already loaded."""
        if self._batches is None:
            self._batches = iter(
                StatefulDataLoader(
                    _GlobalBatches(self.loader),
                    batch_size=None,
                    sampler=_From(self.loader.state_dict()["next_batch"]),
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                )
            )
        batch = next(self._batches)
        self.loader.load_state_dict({"next_batch": self.loader.state_dict()["next_batch"] + 1})
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position of the next global batch, as BatchLoader.state_dict."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position; the workers restart there on the next batch."""
        self.loader.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later next_batch starts new ones)."""
        self._batches = None
