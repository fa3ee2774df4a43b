"""The device mesh: tensor parallel, FSDP x TP and HSDP train exactly as one process, and checkpoints cross layouts."""

from __future__ import annotations

import pytest
import torch

from conftest import AUDIT_TEMPLATES, assert_one_line_error, losses, read_metrics, run_keel, tiny_config
from keel.config import ParallelConfig
from keel.distributed.mesh import Layout, resolve_layout
from keel.errors import ConfigError
from keel.models import model_args


def train(tmp_path, dataset, name, nproc, *extra, **parallel):
    # Validated and audited (the small templates) before the first step and after the last.
    observe = {"audit_every": 5, "audit_templates": str(AUDIT_TEMPLATES)}
    cfg = tiny_config(
        tmp_path / f"{name}.toml",
        dataset,
        run={"name": name},
        parallel={"nproc": nproc, **parallel},
        train={"eval_every": 5},
        observe=observe,
    )
    result = run_keel("train", str(cfg), *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset):
    return train(tmp_path_factory.mktemp("single"), dataset, "one", 1)


@pytest.mark.parametrize(
    ("nproc", "parallel"),
    [(2, {"tp": 2}), (4, {"tp": 2}), (4, {"dp_replicate": 2})],
    ids=["tp2", "fsdp2xtp2", "hsdp2x2"],
)
def test_layouts_train_exactly_as_one_process(tmp_path, dataset, single, nproc, parallel):
    run = train(tmp_path, dataset, "mesh", nproc, **parallel)
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    # Gradient norms per parameter group see every shard once, replicated or split.
    groups = {k: v for k, v in read_metrics(run)[0].items() if k.startswith("grad_norm")}
    reference = {k: v for k, v in read_metrics(single)[0].items() if k.startswith("grad_norm")}
    assert groups == pytest.approx(reference, rel=1e-4)

    # Validation per source and the audit's gaps: each data-parallel slice counted once, tensor-parallel ranks alike.
    def evaluations(run_dir):
        by_step: dict[int, dict[str, float]] = {}
        for r in read_metrics(run_dir):
            values = {k: v for k, v in r.items() if k.startswith(("val_", "audit_gap/"))}
            if values:
                by_step.setdefault(r["step"], {}).update(values)
        return by_step

    expected = evaluations(single)
    assert expected.keys() == {0, 5} and {"val_loss/*.txt", "val_ppl/*.jsonl", "audit_gap/pets"} <= expected[5].keys()
    got = evaluations(run)
    assert got.keys() == expected.keys()
    for step, want in expected.items():
        assert got[step] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_a_checkpoint_crosses_layouts_tp_then_fsdp_then_one_process(tmp_path, dataset, single):
    cfg = tiny_config(tmp_path / "c.toml", dataset, run={"name": "chain"}, checkpoint={"every": 1})
    run = tmp_path / "runs" / "chain"
    legs = [
        ["train", str(cfg), "--nproc", "2", "--set", "parallel.tp=2", "--set", "train.stop_after=2"],
        ["train", "--resume", str(run), "--nproc", "2", "--set", "parallel.tp=1", "--set", "train.stop_after=4"],
        ["train", "--resume", str(run), "--nproc", "1"],
    ]
    for leg in legs:
        result = run_keel(*leg, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)


def test_layout_resolution_fills_in_the_rest_and_names_what_does_not_fit():
    assert resolve_layout(ParallelConfig(tp=2), 8) == Layout(dp_replicate=1, dp_shard=4, tp=2)
    assert resolve_layout(ParallelConfig(dp_replicate=-1, dp_shard=2), 8) == Layout(4, 2, 1)
    with pytest.raises(ConfigError, match="parallel.dp_shard: the other mesh dimensions .3 processes. do not divide"):
        resolve_layout(ParallelConfig(tp=3), 8)
    with pytest.raises(ConfigError, match="is 4 processes, not the 8 launched"):
        resolve_layout(ParallelConfig(dp_shard=2, tp=2), 8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["parallel.tp=3"], "parallel.dp_shard: the other mesh dimensions (3 processes) do not divide the 2"),
        (["parallel.tp=2", "model.n_kv_heads=1"], "parallel.tp: 2 does not divide model.n_kv_heads (1)"),
        (["parallel.tp=2", "model.tie_embeddings=true"], "parallel.tp: tied embeddings are not split"),
        (["parallel.dp_shard=-1", "parallel.dp_replicate=-1"], "parallel.dp_replicate: only one of"),
        (["parallel.dp_shard=1"], "parallel: the mesh dp_replicate 1 x dp_shard 1 x tp 1 is 1 processes, not the 2"),
    ],
)
def test_a_mesh_that_does_not_fit_is_one_line_before_any_process(tmp_path, dataset, settings, message):
    cfg = tiny_config(tmp_path / "c.toml", dataset, parallel={"nproc": 2})
    result = run_keel("train", str(cfg), *(a for s in settings for a in ("--set", s)), cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()


def test_training_builds_the_model_on_the_meta_device_before_sharding():
    # The llama-1b preset's 1.2 B parameters: nothing is allocated until each rank allocates its shards.
    spec, args = model_args({"name": "llama", "dim": 2048, "n_layers": 16, "n_heads": 32, "vocab_size": 128256})
    with torch.device("meta"):
        model = spec.build(args)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == spec.num_params(args) > 1e9
