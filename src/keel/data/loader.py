"""Batches for training and evaluation: the global sample order is a pure function of (seed, index)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from keel.config import split_batch
from keel.data.dataset import TokenDataset
from keel.data.mixture import MixtureOrder
from keel.errors import DataError


class Batch(NamedTuple):
    """A micro batch: inputs and targets [B, S], plus per-document positions and document ids [B, S] if asked for."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor | None = None
    documents: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        return Batch(*(t if t is None else t.to(device, non_blocking=True) for t in self))


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, how many EOS tokens precede it in its row: the EOS ends its document, the next token starts one."""
    eos = (inputs == eos_id).long()
    return eos.cumsum(-1) - eos


def position_ids(documents: torch.Tensor) -> torch.Tensor:
    """Per token, its offset from the first token of its document within the row (0 at each document's start)."""
    index = torch.arange(documents.shape[-1]).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(-1).values


def make_batch(rows: np.ndarray, eos_id: int, positions: bool = False, documents: bool = False) -> Batch:
    """Split windows of seq_len + 1 tokens into a Batch, with per-document positions and ids where asked for."""
    # A window that starts inside a document counts positions from the window start, as Megatron and torchtitan
    # do: the true offset would cost a document-index search per sample, and RoPE within a document sees only
    # differences of positions, which are the same either way.
    tokens = torch.from_numpy(rows)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if not (positions or documents):
        return Batch(inputs, targets)
    ids = document_ids(inputs, eos_id)
    return Batch(inputs, targets, position_ids(ids) if positions else None, ids if documents else None)


class GlobalSampleOrder:
    """Map a global sample index to a sample id: each epoch is its own permutation, seeded by (seed, epoch)."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.seed = num_samples, seed
        self._epochs: dict[int, np.ndarray] = {}

    def sample(self, global_index: int) -> int:
        """The sample id at this position of the endless, epoch-by-epoch shuffled stream."""
        epoch, position = divmod(global_index, self.num_samples)
        return int(self._permutation(epoch)[position])

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._epochs.get(epoch)
        if perm is None:
            # Two cached epochs suffice: a batch spans at most the end of one and the start of the next.
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._epochs[epoch] = perm
        return perm


def num_samples(dataset: TokenDataset, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in the split; none is a DataError."""
    count = (dataset.num_tokens - 1) // seq_len
    if count < 1:
        raise DataError(
            f"the {dataset.split} split of {dataset.dir} has {dataset.num_tokens} tokens, too few for one sample "
            f"of train.seq_len={seq_len} (+1) tokens; lower train.seq_len or add data"
        )
    return count


def read_samples(
    dataset: TokenDataset, sample_ids: list[int], seq_len: int, positions: bool = False, documents: bool = False
) -> Batch:
    """Inputs and targets [len(sample_ids), seq_len]: each window and the same window shifted by one."""
    rows = np.stack([dataset.read(i * seq_len, seq_len + 1) for i in sample_ids])
    return make_batch(rows, dataset.eos_id, positions, documents)


class BatchLoader:
    """This rank's micro batches of each global batch; the position is a global batch count, valid on any world size."""

    def __init__(
        self,
        dataset: TokenDataset | list[TokenDataset],
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        weights: list[float] | None = None,
        document_positions: bool = False,
        document_mask: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.per_rank = split_batch(global_batch_size, world_size, micro_batch_size)
        self.datasets = dataset if isinstance(dataset, list) else [dataset]
        self.seq_len = seq_len
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank = rank
        # One source is the one-weight mixture: index g maps to (0, g), so the order equals the plain dataset's.
        self.mixture = MixtureOrder(weights or [1.0] * len(self.datasets), seed)
        self.orders = [GlobalSampleOrder(num_samples(d, seq_len), seed + k) for k, d in enumerate(self.datasets)]
        self.order = self.orders[0]
        # Only what the batch carries changes; which tokens make up each sample stays a function of the order.
        self.document_positions, self.document_mask = document_positions, document_mask
        self._next_batch = 0

    def next_batch(self) -> list[Batch]:
        """This rank's micro batches, each [micro_batch_size, seq_len], of the next global batch."""
        batch = self.batch_at(self._next_batch)
        self._next_batch += 1
        return batch

    def batch_at(self, position: int) -> list[Batch]:
        """This rank's micro batches of global batch `position`; reads only, so worker processes can call it."""
        first = position * self.global_batch_size + self.rank * self.per_rank
        picks = [self.locate(first + k) for k in range(self.per_rank)]
        micro = self.micro_batch_size
        return [self._read(picks[i : i + micro]) for i in range(0, self.per_rank, micro)]

    def locate(self, global_index: int) -> tuple[int, int]:
        """(dataset, sample id) at a global sample index: a pure function of weights, seed and index."""
        k, position = self.mixture.locate(global_index)
        return k, self.orders[k].sample(position)

    def _read(self, picks: list[tuple[int, int]]) -> Batch:
        rows = np.stack([self.datasets[k].read(i * self.seq_len, self.seq_len + 1) for k, i in picks])
        # A mixture's datasets share one tokenizer (open_mixture checks), so one EOS id serves every row.
        return make_batch(rows, self.datasets[0].eos_id, self.document_positions, self.document_mask)

    def state_dict(self) -> dict[str, int]:
        """The loader's whole state: how many global batches have been taken."""
        return {"next_batch": self._next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a state_dict, saved on this or any other world size."""
        position = state["next_batch"]
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"next_batch must be a non-negative int, got {position!r}")
        self._next_batch = position


def eval_sample_ids(
    dataset: TokenDataset, *, seq_len: int, batch_size: int, num_batches: int, rank: int, world_size: int
) -> Iterator[list[int]]:
    """This rank's sample ids of each evaluation batch: the split's first samples, wrapping if it is small."""
    per_rank = split_batch(batch_size, world_size)
    count = num_samples(dataset, seq_len)
    for b in range(num_batches):
        first = b * batch_size + rank * per_rank
        yield [(first + k) % count for k in range(per_rank)]
