"""Pipeline parallel: 1F1B and interleaved schedules train exactly as one process, with FSDP per stage, and
checkpoints cross between pipelined and unpipelined layouts; what it cannot run is one line before any process."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODEL, assert_one_line_error, keel_here, losses, read_metrics, run_keel, tiny_config
from keel.config import ParallelConfig
from keel.distributed.mesh import Layout, resolve_layout
from keel.distributed.pipeline import merged, rank_stages, split_stage, stage_blocks
from keel.io import read_jsonl
from keel.models import model_args

MODEL = {**TINY_MODEL, "n_layers": 4}  # four blocks: two ranks of two interleaved stages each


def config(tmp_path, dataset, name, **sections):
    return tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name}, model=MODEL, **sections)


def sets(settings):
    return [a for s in settings for a in ("--set", s)]


def train(tmp_path, dataset, name, *settings, nproc=1):
    cfg = config(tmp_path, dataset, name)
    result = run_keel("train", str(cfg), "--nproc", str(nproc), *sets(settings), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name


def group_norms(run):
    return {k: v for k, v in read_metrics(run)[0].items() if k.startswith("grad_norm")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset):
    return train(tmp_path_factory.mktemp("single"), dataset, "one")


def test_1f1b_over_two_stages_trains_exactly_as_one_process(tmp_path, dataset, single):
    run = train(tmp_path, dataset, "pp", "parallel.pp=2", nproc=2)
    # The logged loss is the mean over ranks: equal only if the first stage's rank has the last stage's loss too.
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    # Gradient norms add up over the stages, per group too.
    assert group_norms(run) == pytest.approx(group_norms(single), rel=1e-5)


@pytest.mark.soak  # four processes each, a few minutes on two cores; run by `make soak`
@pytest.mark.parametrize(
    ("nproc", "settings"),
    [
        (4, ["parallel.pp=2", "parallel.tp=2"]),
        (4, ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.pp_schedule=interleaved_1f1b"]),  # dp_shard 1
        (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "train.micro_batch_size=4", "parallel.pp_microbatches=2"]),
    ],
    ids=["pp2xtp2", "pp2xhsdp-interleaved", "gpipe-accumulating"],
)
def test_more_pipelined_layouts_train_exactly_as_one_process(tmp_path, dataset, single, nproc, settings):
    run = train(tmp_path, dataset, "pp", *settings, nproc=nproc)
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    assert group_norms(run) == pytest.approx(group_norms(single), rel=1e-5)


@pytest.mark.soak
def test_packed_documents_with_their_mask_pipeline_exactly_as_one_process(tmp_path, dataset):
    packed = ["data.document_mask=true", "data.document_positions=true", "train.eval_every=5"]
    one = train(tmp_path, dataset, "one", *packed)
    run = train(tmp_path, dataset, "pp", "parallel.pp=2", *packed, nproc=2)
    validation = [[r["val_loss"] for r in read_metrics(r) if "val_loss" in r] for r in (one, run)]
    assert len(validation[0]) == 2 and validation[1] == pytest.approx(validation[0], rel=1e-5)
    assert losses(run) == pytest.approx(losses(one), rel=1e-5)


def test_a_checkpoint_crosses_one_process_interleaved_pipeline_with_fsdp_and_back(tmp_path, dataset, single):
    # 1 process -> pp 2 x dp_shard 2 (4 processes, two interleaved stages each) -> 1 process: the same losses.
    cfg = config(tmp_path, dataset, "chain", checkpoint={"every": 1})
    run = tmp_path / "runs" / "chain"
    pipelined = ["--set", "parallel.pp=2", "--set", "parallel.pp_schedule=interleaved_1f1b"]
    legs = [
        ["train", str(cfg), "--set", "train.stop_after=1"],
        ["train", "--resume", str(run), "--nproc", "4", *pipelined, "--set", "train.stop_after=4"],
        ["train", "--resume", str(run), "--nproc", "1", "--set", "parallel.pp=1"],
    ]
    for leg in legs:
        result = run_keel(*leg, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
    resumes = [e["world_size"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert resumes == [4, 1]


def test_stages_split_the_blocks_and_keep_every_parameter_name():
    assert stage_blocks(4, 2) == [[0, 1], [2, 3]]
    assert stage_blocks(5, 3) == [[0, 1], [2, 3], [4]]  # the extra blocks go to the first stages
    assert rank_stages(1, pp=2, per_rank=2) == [1, 3]
    spec, args = model_args({"name": "llama", **MODEL, "vocab_size": 64})
    with torch.device("meta"):
        model = spec.build(args)
    blocks = stage_blocks(4, 4)
    stages = [split_stage(model, spec.pipeline, blocks[s], s == 0, s == 3) for s in range(4)]
    names = [set(dict(stage.named_parameters())) for stage in stages]
    assert set().union(*names) == set(dict(model.named_parameters()))
    assert sum(map(len, names)) == len(dict(model.named_parameters()))  # disjoint
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[3]
    # A rank's interleaved stages 1 and 3, seen as one module under the model's own names.
    assert set(dict(merged([stages[1], stages[3]]).named_parameters())) == names[1] | names[3]


def test_layout_puts_the_pipeline_outermost_and_fills_in_the_rest():
    assert resolve_layout(ParallelConfig(pp=2, tp=2), 8) == Layout(dp_replicate=1, dp_shard=2, tp=2, pp=2)
    assert Layout(dp_shard=2, pp=2).describe() == "pp 2 x dp_replicate 1 x dp_shard 2 x tp 1"
    assert ParallelConfig(pp=2, pp_schedule="interleaved_1f1b").pipeline_microbatches == 4


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["parallel.pp=4", "parallel.dp_shard=1", "model.n_layers=2"], "parallel.pp: 4 pipeline stages (pp 4 x 1"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "model.n_layers=3"], "the model has 3 blocks"),
        (["parallel.pp=2", "parallel.pp_microbatches=3"], "parallel.pp_microbatches: 3 does not divide the 4"),
        (["parallel.pp=2", "parallel.pp_microbatches=1"], "1f1b needs at least one micro-batch per pipeline rank"),
        (["parallel.pp=2", "parallel.pp_stages_per_rank=2"], "parallel.pp_stages_per_rank: 1f1b runs one stage"),
        (["parallel.pp=2", "model.tie_embeddings=true"], "parallel.pp: tied embeddings would live on both"),
        (["parallel.pp=2", "observe.audit_every=5"], "observe.audit_every: the bias audit scores batches"),
        (["parallel.pp=3"], "parallel.dp_shard: the other mesh dimensions (3 processes) do not divide the 4"),
    ],
)
def test_a_pipeline_that_cannot_run_is_one_line_before_any_process(
    tmp_path, dataset, settings, message, monkeypatch, capsys
):
    # In-process: the same entry point as the console script, without an interpreter start per case.
    cfg = config(tmp_path, dataset, "bad", parallel={"nproc": 4}, train={"global_batch_size": 8})
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(keel_here(capsys, "train", str(cfg), *sets(settings)), message)
    assert not (tmp_path / "runs").exists()
