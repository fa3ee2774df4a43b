"""Weighted mixtures: exact proportions, a pure order independent of world size, one tokenizer."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from keel.data.loader import BatchLoader
from keel.data.mixture import MixtureOrder, block_quotas, open_mixture
from keel.data.prepare import prepare_dataset
from keel.errors import ConfigError, DataError


def _quiet(_: str) -> None:
    pass


def _corpus(root: Path, word: str, docs: int = 30) -> str:
    rng = random.Random(word)
    root.mkdir(parents=True)
    for i in range(docs):
        (root / f"{i}.txt").write_text(" ".join(f"{word}{rng.randint(0, 50)}" for _ in range(80)))
    return str(root / "*.txt")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("mix")
    a, b = root / "a", root / "b"
    prepare_dataset([_corpus(root / "ra", "alpha")], a, vocab_size=300, val_fraction=0.1, log=_quiet)
    prepare_dataset(
        [_corpus(root / "rb", "beta")], b, tokenizer=str(a / "tokenizer.json"), val_fraction=0.1, log=_quiet
    )
    return [a, b]


def test_realised_proportions_match_the_weights_within_one_percent():
    order = MixtureOrder([0.7, 0.2, 0.1], seed=3)
    for n in (1000, 5000, 12_345):
        counts = Counter(order.locate(i)[0] for i in range(n))
        for k, w in enumerate([0.7, 0.2, 0.1]):
            assert abs(counts[k] / n - w) < 0.01


def test_each_source_stream_is_used_once_in_order():
    order = MixtureOrder([2, 1], seed=0)
    positions: dict[int, list[int]] = {0: [], 1: []}
    for i in range(3000):
        k, pos = order.locate(i)
        positions[k].append(pos)
    assert order.quotas == [667, 333]
    assert positions[0] == list(range(3 * 667)) and positions[1] == list(range(3 * 333))


def test_quotas_round_by_largest_remainder():
    assert block_quotas([1, 1, 1], 1000) == [334, 333, 333]
    assert sum(block_quotas([0.123, 0.456, 0.421])) == 1000


def test_mixture_loader_sees_the_same_samples_on_any_world_size(two):
    datasets, weights = open_mixture({str(two[0]): 0.75, str(two[1]): 0.25}, "train")

    def global_batches(world: int) -> list:
        loaders = [
            BatchLoader(
                datasets,
                weights=weights,
                seq_len=16,
                global_batch_size=8,
                micro_batch_size=8 // world,
                rank=r,
                world_size=world,
                seed=5,
            )
            for r in range(world)
        ]
        out = []
        for _ in range(4):
            out.append([row for ld in loaders for row in ld.next_batch()[0][0].tolist()])
        return out

    assert global_batches(1) == global_batches(2) == global_batches(4)


def test_mixture_draws_from_both_datasets_by_weight(two):
    datasets, weights = open_mixture({str(two[0]): 0.75, str(two[1]): 0.25}, "train")
    loader = BatchLoader(
        datasets, weights=weights, seq_len=16, global_batch_size=8, micro_batch_size=8, rank=0, world_size=1, seed=0
    )
    picks = Counter(loader.locate(i)[0] for i in range(2000))
    assert picks == {0: 1500, 1: 500}


def test_mixture_of_datasets_with_different_tokenizers_is_an_error(two, tmp_path):
    other = tmp_path / "c"
    prepare_dataset([_corpus(tmp_path / "rc", "gamma")], other, vocab_size=280, val_fraction=0.1, log=_quiet)
    with pytest.raises(DataError, match="has another tokenizer than .*prepare every dataset of a mixture"):
        open_mixture({str(two[0]): 1, str(other): 1}, "train")


def test_all_zero_weights_are_a_config_error():
    with pytest.raises(ConfigError, match="data.mixture weights"):
        MixtureOrder([0, 0], seed=0)


def test_global_indices_invert_locate_for_each_source():
    order = MixtureOrder([3.0, 1.0, 0.5], seed=7, block=40)
    where = [order.locate(g) for g in range(400)]
    for k in range(3):
        positions = [p for source, p in where if source == k]
        expected = [g for g, (source, _) in enumerate(where) if source == k]
        assert order.global_indices(k, np.array(positions)).tolist() == expected
    assert MixtureOrder([1.0, 0.0], seed=0).global_indices(1, np.array([0, 1])).size == 0
