"""Low precision applied from outside the model: FSDP2's mixed-precision policy and float8 linear layers (torchao)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ROOT, assert_one_line_error, losses, run_keel, tiny_config
from keel.checkpoint.safe_load import read_metadata
from keel.config import Config
from keel.config_toml import load_config
from keel.distributed.float8 import convert_to_float8
from keel.distributed.parallel import mixed_precision
from keel.models import model_args
from keel.models.loss import next_token_loss
from keel.observe.card import low_precision_notes
from keel.plan.devices import GPUS
from keel.plan.planner import config_plan, planned_model

STEPS = 6
# bf16 keeps 8 significant bits (relative rounding 2^-9, about 0.2%) per parameter and activation; the loss is a mean
# over 256 tokens, so its rounding averages down. Measured: within 3e-4 of fp32 after 8 steps; 5e-3 leaves room.
BF16_REL = 5e-3
# float8 e4m3 keeps 4 significant bits (rounding 2^-4, about 6%) per element, scaled per tensor; each output sums 64+
# products whose errors partly cancel. Measured: within 3e-4 of fp32 after 8 steps; 1e-2 leaves room.
FP8_REL = 1e-2
# Layouts of the same fp32 math agree within 1e-5 (tests/test_mesh.py): a larger gap is bf16 at work.
FP32_REL = 1e-5


def train(tmp_path, dataset, name, *args: str, **sections: dict) -> object:
    cfg = tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name}, **sections)
    result = run_keel("train", str(cfg), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name


def rel_gaps(got: list[float], want: list[float]) -> list[float]:
    assert len(got) == len(want) == STEPS
    return [abs(g - w) / abs(w) for g, w in zip(got, want, strict=True)]


@pytest.fixture(scope="module")
def fp32_fsdp(tmp_path_factory, dataset):
    """Two processes under FSDP2 in fp32: the reference."""
    return train(tmp_path_factory.mktemp("fp32"), dataset, "fp32", "--nproc", "2", train={"steps": STEPS})


def test_bf16_fsdp_params_train_like_fp32_and_keep_fp32_master_weights_that_resume_without_it(
    tmp_path, dataset, fp32_fsdp
):
    run = train(
        tmp_path,
        dataset,
        "bf16",
        "--nproc",
        "2",
        train={"steps": STEPS, "stop_after": 3},
        parallel={"fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "float32"},
        checkpoint={"every": 3},
    )
    # The sharded parameters and the optimizer's states are fp32: the checkpoint holds them as they are.
    dtypes = {
        key: meta.properties.dtype
        for key, meta in read_metadata(run / "checkpoints" / "step_3").state_dict_metadata.items()
        if hasattr(meta, "properties")
    }
    assert dtypes["model.model.layers.0.attention.wq.weight"] == torch.float32
    assert dtypes["model.optim.layers.0.attention.wq.weight.exp_avg_sq"] == torch.float32
    assert {dtype for key, dtype in dtypes.items() if key.startswith("model.")} == {torch.float32}
    # It resumes in one process, with neither FSDP nor the policy (which a single process would refuse).
    resumed = run_keel(
        "train",
        "--resume",
        str(run),
        "--nproc",
        "1",
        "--set",
        "parallel.fsdp_param_dtype=",
        "--set",
        "parallel.fsdp_reduce_dtype=",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    gaps = rel_gaps(losses(run), losses(fp32_fsdp))
    assert max(gaps) < BF16_REL, gaps
    assert max(gaps[:3]) > FP32_REL, gaps  # the first three steps' forward really ran in bf16
    assert "parameters gathered in bfloat16, gradients reduced in float32" in (run / "logs" / "rank0.log").read_text()


def test_fp8_linear_layers_with_bf16_fsdp_track_the_fp32_run(tmp_path, dataset, fp32_fsdp):
    # bf16 gathers and bf16 reduce-scatters (gloo has both in torch 2.13) around float8 matmuls.
    run = train(
        tmp_path,
        dataset,
        "fp8",
        "--nproc",
        "2",
        train={"steps": STEPS, "fp8": True},
        parallel={"fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "bfloat16"},
    )
    log = (run / "logs" / "rank0.log").read_text()
    line = next(line for line in log.splitlines() if "fp8:" in line)
    assert "14 linear layers" in line and line.endswith("kept as they were: ['output']"), line
    gaps = rel_gaps(losses(run), losses(fp32_fsdp))
    assert max(gaps) < FP8_REL, gaps
    assert max(gaps) > FP32_REL, gaps


def test_float8_conversion_skips_the_output_and_odd_sizes_and_keeps_parameter_names():
    spec, args = model_args({"name": "llama", "dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256})
    torch.manual_seed(0)
    model = spec.build(args)
    names = set(model.state_dict())
    swapped = convert_to_float8(model, spec.high_precision)
    assert len(swapped) == 14 and "output" not in swapped and "layers.0.attention.wq" in swapped
    assert type(model.output) is nn.Linear
    assert set(model.state_dict()) == names  # checkpoints load with or without fp8
    tokens = torch.randint(0, 256, (2, 33))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and model.layers["0"].attention.wq.weight.grad.dtype == torch.float32
    # A layer whose dimensions are not multiples of 16 keeps nn.Linear: the float8 kernels need them.
    odd = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 24))
    assert convert_to_float8(odd, ()) == ["0"]


def test_the_policy_reduces_in_fp32_unless_told_and_leaves_inputs_alone():
    bf16 = mixed_precision(Config.model_validate({"parallel": {"fsdp_param_dtype": "bfloat16"}}))
    assert (bf16.param_dtype, bf16.reduce_dtype, bf16.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    unset = mixed_precision(Config())
    assert (unset.param_dtype, unset.reduce_dtype) == (None, None)


def test_the_model_card_states_the_policy_and_fp8():
    assert low_precision_notes(Config()) == ""
    both = Config.model_validate({"parallel": {"fsdp_param_dtype": "bfloat16"}, "train": {"fp8": True}})
    assert low_precision_notes(both) == (
        ", FSDP2 parameters gathered in bfloat16 and gradients reduced in float32 (fp32 master weights)"
        ", float8 matmuls in the blocks' linear layers (torchao Float8Linear)"
    )


def test_the_planner_counts_bf16_gathers_and_bf16_compute():
    fp32 = load_config(ROOT / "src" / "keel" / "configs" / "llama-1b.toml")
    bf16 = fp32.model_copy(update={"parallel": fp32.parallel.model_copy(update={"fsdp_param_dtype": "bfloat16"})})
    before, after = (config_plan(cfg, planned_model(cfg), GPUS["h100"], 3.0) for cfg in (fp32, bf16))
    assert (before.setup.precision, after.setup.precision) == ("autocast", "bf16")
    assert after.memory.buffers == pytest.approx(before.memory.buffers / 2)  # FSDP2's gathered blocks, in bf16


@pytest.mark.parametrize(
    ("nproc", "settings", "message"),
    [
        ("1", ['parallel.fsdp_param_dtype="bfloat16"'], "parallel.fsdp_param_dtype: applies only to FSDP2"),
        (
            "2",
            ["parallel.dp_replicate=-1", "parallel.dp_shard=1", 'parallel.fsdp_reduce_dtype="bfloat16"'],
            "parallel.fsdp_reduce_dtype: applies only to FSDP2 (data parallel with dp_shard, tp or pp > 1), and this "
            "layout (dp_replicate 2 x dp_shard 1 x tp 1) has none",
        ),
        ("2", ["parallel.tp=2", "train.fp8=true"], "train.fp8: not combined with tensor parallel"),
    ],
    ids=["one-process", "ddp", "fp8-tp"],
)
def test_low_precision_that_would_not_apply_is_one_line_before_any_process(tmp_path, dataset, nproc, settings, message):
    cfg = tiny_config(tmp_path / "c.toml", dataset)
    result = run_keel("train", str(cfg), "--nproc", nproc, *(a for s in settings for a in ("--set", s)), cwd=tmp_path)
    assert_one_line_error(result, message)
    assert not (tmp_path / "runs").exists()
