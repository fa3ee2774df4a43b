"""The prefetching loader (torchdata StatefulDataLoader workers): same batches, same losses, resumable."""

from __future__ import annotations

import pytest

from conftest import losses, read_metrics, run_keel, tiny_config
from keel.data.dataset import TokenDataset
from keel.data.loader import BatchLoader
from keel.data.prefetch import PrefetchLoader


def _loader(dataset, world: int = 1, rank: int = 0) -> BatchLoader:
    return BatchLoader(
        TokenDataset(dataset, "train"),
        seq_len=16,
        global_batch_size=8,
        micro_batch_size=4 // world,
        rank=rank,
        world_size=world,
        seed=1,
    )


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_workers_yield_the_inline_batches_and_resume_from_the_saved_position(dataset):
    inline, ahead = _loader(dataset), PrefetchLoader(_loader(dataset), num_workers=2, prefetch_factor=2)
    for _ in range(6):
        for a, b in zip(inline.next_batch(), ahead.next_batch(), strict=True):
            assert a[0].equal(b[0]) and a[1].equal(b[1])
    state = ahead.state_dict()
    assert state == {"next_batch": 6} and all(isinstance(v, int) for v in state.values())
    resumed = PrefetchLoader(_loader(dataset), num_workers=1, prefetch_factor=1)
    resumed.load_state_dict(state)
    assert resumed.next_batch()[0][0].equal(inline.next_batch()[0][0])


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
