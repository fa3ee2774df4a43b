"""Activation checkpointing: the same losses as without it, less saved for backward, checkpoints that load anywhere."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from conftest import losses, read_metrics, run_keel, tiny_config
from keel.config_toml import load_config
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.models import model_args
from keel.models.loss import next_token_loss

MODES = [("none", 0), ("full", 0), ("selective", 2), ("selective", 0)]


def peak_bytes(mode: str, every: int) -> int:
    """Peak memory of a forward and backward of a 4-block Llama under an activation checkpointing mode."""
    spec, args = model_args({"name": "llama", "dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 256})
    torch.manual_seed(0)
    model = spec.build(args)
    apply_activation_checkpointing(model, spec.shard_units, mode, every)
    tokens = torch.randint(0, 256, (4, 129))
    tracker = MemTracker()  # torch's own tracker of live tensors by kind, on any device
    tracker.track_external(model)
    with tracker:
        next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_checkpointing_saves_less_for_backward_the_more_it_recomputes():
    none, full, every_2nd, per_op = (peak_bytes(*m) for m in MODES)
    assert full < per_op < none, (none, full, every_2nd, per_op)
    assert full < every_2nd < none


def test_losses_equal_those_without_checkpointing_in_every_mode(tmp_path, dataset):
    runs = {}
    names = ("plain", "full", "every-2nd", "per-op")
    for name, (mode, every) in zip(names, MODES, strict=True):
        cfg = tiny_config(
            tmp_path / f"{name}.toml",
            dataset,
            run={"name": name},
            model={"name": "llama", "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
            train={"activation_checkpointing": mode, "ac_every": every},
        )
        assert run_keel("train", str(cfg), cwd=tmp_path).returncode == 0
        runs[name] = tmp_path / "runs" / name
    for name in ("full", "every-2nd", "per-op"):
        assert losses(runs[name]) == losses(runs["plain"]), name
        groups = {k for k in read_metrics(runs[name])[0] if k.startswith("grad_norm/")}
        assert "grad_norm/layers.attention.wq" in groups and not any("wrapped" in g for g in groups)


@pytest.mark.soak  # three multi-process runs: about half a minute
def test_a_checkpoint_of_a_sharded_checkpointed_run_resumes_without_it(tmp_path, dataset):
    train = {"steps": 10, "stop_after": 5, "activation_checkpointing": "full"}
    cfg = tiny_config(tmp_path / "c.toml", dataset, train=train, checkpoint={"every": 5})
    assert run_keel("train", str(cfg), "--nproc", "2", cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    resumed = run_keel("train", "--resume", str(run), "--set", 'train.activation_checkpointing="none"', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    reference = tiny_config(tmp_path / "r.toml", dataset, run={"name": "ref"}, train={"steps": 10})
    assert run_keel("train", str(reference), "--nproc", "2", cwd=tmp_path).returncode == 0
    assert losses(run) == pytest.approx(losses(tmp_path / "runs" / "ref"), rel=1e-5)
    assert load_config(run / "config.toml").train.activation_checkpointing == "none"
