"""The prefetching loader (torchdata StatefulDataLoader workers): same batches, same losses, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import losses, read_metrics, run_keel, tiny_config
from keel.data.dataset import TokenDataset
from keel.data.loader import Batch, BatchLoader, GlobalSampleOrder, document_ids, position_ids
from keel.data.prefetch import PrefetchLoader


def _loader(dataset, world: int = 1, rank: int = 0, documents: bool = False) -> BatchLoader:
    return BatchLoader(
        TokenDataset(dataset, "train"),
        seq_len=16,
        global_batch_size=8,
        micro_batch_size=4 // world,
        rank=rank,
        world_size=world,
        seed=1,
        document_positions=documents,
        document_mask=documents,
    )


def _same(a: Batch, b: Batch) -> bool:
    return all(x is y is None or (x is not None and y is not None and x.equal(y)) for x, y in zip(a, b, strict=True))


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("documents", [False, True])
def test_workers_yield_the_inline_batches_and_resume_from_the_saved_position(dataset, documents):
    inline = _loader(dataset, documents=documents)
    ahead = PrefetchLoader(_loader(dataset, documents=documents), num_workers=2, prefetch_factor=2)
    for _ in range(6):
        for a, b in zip(inline.next_batch(), ahead.next_batch(), strict=True):
            assert _same(a, b) and (a.documents is not None) == documents
    state = ahead.state_dict()
    assert state == {"next_batch": 6} and all(isinstance(v, int) for v in state.values())
    resumed = PrefetchLoader(_loader(dataset, documents=documents), num_workers=1, prefetch_factor=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch()[0][0].equal(inline.next_batch()[0][0])


def test_document_ids_and_positions_restart_after_each_eos():
    inputs = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 0, 3], [0, 4, 4, 4, 4, 4, 4, 4, 4]])
    documents = document_ids(inputs, eos_id=0)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert position_ids(documents).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6, 7]]


def test_document_batches_hold_the_same_samples_with_positions_and_ids(dataset):
    plain, packed = _loader(dataset), _loader(dataset, documents=True)
    eos_id, eos_seen = TokenDataset(dataset, "train").eos_id, 0
    for _ in range(4):
        for a, b in zip(plain.next_batch(), packed.next_batch(), strict=True):
            assert a.positions is a.documents is None and a.inputs.equal(b.inputs) and a.targets.equal(b.targets)
            assert b.positions.shape == b.documents.shape == b.inputs.shape == (4, 16)
            after_eos = b.inputs[:, :-1] == eos_id
            eos_seen += int(after_eos.sum())
            # A window starts a document; after an EOS, a new document starts at position 0.
            assert (b.positions[:, 0] == 0).all() and (b.documents[:, 0] == 0).all()
            assert b.positions[:, 1:].equal(torch.where(after_eos, 0, b.positions[:, :-1] + 1))
            assert b.documents[:, 1:].equal(b.documents[:, :-1] + after_eos.long())
    assert eos_seen > 0
    assert packed.state_dict() == {"next_batch": 4}


def test_training_with_workers_and_a_one_dataset_mixture_matches_inline_and_resumes(tmp_path, dataset):
    def train(name: str, **data) -> object:
        train_keys = {"steps": 6, "stop_after": 3} if name == "part" else {"steps": 6}
        config = tiny_config(
            tmp_path / f"{name}.toml",
            dataset,
            run={"name": name, "seed": 0},
            data={"dataset": str(dataset), **data},
            train=train_keys,
            checkpoint={"every": 3},
        )
        result = run_keel("train", str(config), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return tmp_path / "runs" / name

    inline = train("inline")
    part = train("part", num_workers=2, prefetch_factor=2, mixture={str(dataset): 1.0})
    resumed = run_keel("train", "--resume", str(part), "--set", "train.stop_after=100", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert losses(part) == losses(inline)
    assert all("data_wait_s" in r for r in read_metrics(part) if "loss" in r)


def test_indices_of_inverts_the_sample_order_across_epochs():
    order = GlobalSampleOrder(50, seed=3)
    wanted = np.zeros(50, dtype=bool)
    wanted[[0, 7, 49]] = True
    expected = [g for g in range(170) if wanted[order.sample(g)]]  # three epochs and a part
    assert order.indices_of(wanted, 170).tolist() == expected and len(expected) == 10
