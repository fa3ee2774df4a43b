"""`keel plan`: the plan of a GPU run adds up, refusals name fixes that fit, the search lists layouts that fit, the
preflight refuses what does not fit, and the memory model matches torchtitan's published per-GPU memory."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, keel_here, read_metrics, run_keel, tiny_config
from keel.config_toml import dump_toml, load_config
from keel.io import read_jsonl
from keel.models import model_args
from keel.models.spec import MemoryShape
from keel.observe.report import write_report
from keel.plan.devices import GPUS, gpu_device
from keel.plan.memory import Setup, estimate
from keel.plan.planner import config_plan, planned_model, variants
from keel.train.checks import check_layout
from keel.train.planning import layout_allowed

GIB = 2**30
# Llama 3.1 8B and 70B (the 8B's SwiGLU width is 14,336, the 70B's 28,672; untied embeddings).
LLAMA3_8B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 14336, "vocab_size": 128256}
LLAMA3_70B = {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_hidden": 28672, "vocab_size": 128256}


def config(path: Path, model: dict, **sections: dict) -> Path:
    """A config of `model` (seq 8192) on 8 processes, with `sections` overriding keys."""
    table = {
        "model": {"name": "llama", "max_seq_len": 8192, **model},
        "train": {"steps": 1000, "seq_len": 8192, "global_batch_size": 16, "micro_batch_size": 2},
        "parallel": {"nproc": 8},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    path.write_text(dump_toml(table), encoding="utf-8")
    return path


def test_the_plan_of_a_sharded_gpu_run_adds_up():
    cfg = load_config(ROOT / "src" / "keel" / "configs" / "llama-1b.toml")
    model = planned_model(cfg)
    h100 = GPUS["h100"]
    plan = config_plan(cfg, model, h100, 3.0)
    params = model.spec.num_params(model.args)
    s, m = plan.setup, plan.memory
    assert (s.dp_shard, s.micro_batch, s.accumulation, s.precision) == (8, 2, 16, "autocast")
    assert m.parameters == pytest.approx(4 * params / 8, rel=1e-3)
    assert m.optimizer == pytest.approx(2 * m.parameters)
    assert m.gradients == pytest.approx(4 * params, rel=1e-3)  # FSDP2 keeps accumulated gradients unsharded
    flops = model.spec.flops_per_token(model.args, 4096) * 256 * 4096
    assert plan.speed.step_s == pytest.approx(flops / (8 * 989e12 * 0.39))  # the gradient exchange hides behind it
    assert plan.device_hours == pytest.approx(8 * 50_000 * plan.speed.step_s / 3600)
    assert plan.cost == pytest.approx(3.0 * plan.device_hours)
    assert plan.energy_kwh == pytest.approx(0.7 * plan.device_hours)
    assert plan.fits and m.total < h100.memory


def test_keel_plan_prints_memory_time_cost_and_energy(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.toml", tmp_path / "no-dataset-yet", model={"vocab_size": 0})
    out = keel_here(capsys, "plan", str(cfg), "--device", "cpu", "--price-per-device-hour", "0.5")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "from prepare.vocab_size: no dataset yet" in text
    for part in ("parameters", "gradients", "optimizer", "activations", "framework", "allocator"):
        assert re.search(rf"^  {part} +\d+\.\d+ GB", text, re.M), part
    assert re.search(r"^step time +\d", text, re.M) and "tokens/day" in text and "device-hours" in text
    assert "at $0.50 per device-hour" in text and "kWh" in text and "measured: Keel's trainer" in text


def test_a_layout_that_does_not_fit_is_refused_with_fixes_that_fit(tmp_path, capsys):
    cfg = config(tmp_path / "8b.toml", LLAMA3_8B)
    out = keel_here(capsys, "plan", str(cfg), "--device", "h100")
    line = assert_one_line_error(out, "parallel:", "more than the 85.5 GB of a H100 SXM", "it fits with")
    assert "does NOT fit" in out.stdout  # the plan itself, with its breakdown, is printed first
    fixes = re.findall(r'train\.(activation_checkpointing)="(\w+)"|train\.(micro_batch_size)=(\d+)', line)
    assert fixes, line
    for mode_key, mode, micro_key, micro in fixes:
        key, value = (mode_key, f'"{mode}"') if mode_key else (micro_key, micro)
        fixed = planned_model(load_config(cfg, [f"train.{key}={value}"]))
        plan = config_plan(load_config(cfg, [f"train.{key}={value}"]), fixed, GPUS["h100"], 2.0)
        assert plan.fits, (key, value)


def test_search_lists_the_fastest_layouts_that_fit(tmp_path, capsys):
    cfg = config(tmp_path / "8b.toml", LLAMA3_8B)
    out = keel_here(capsys, "plan", str(cfg), "--device", "h100", "--search")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.split("that fit:\n")[1].splitlines()[1:]]
    assert len(rows) >= 3
    steps = [float(row[7]) for row in rows]
    assert steps == sorted(steps) and all(float(row[6]) <= 85.5 for row in rows)
    assert {int(row[3]) for row in rows} > {1}  # tensor-parallel layouts among them
    assert all(int(row[0]) * int(row[1]) * int(row[2]) * int(row[3]) == 8 for row in rows)


def test_keel_train_refuses_a_model_too_large_for_the_machine_before_creating_anything(tmp_path, dataset):
    huge = {"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "max_seq_len": 64}
    cfg = tiny_config(tmp_path / "huge.toml", dataset, model=huge)
    out = run_keel("train", str(cfg), cwd=tmp_path)
    assert_one_line_error(out, "parallel:", "GB per rank", "of a CPU")
    assert not (tmp_path / "runs").exists()


def test_bad_input_is_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.toml", tmp_path / "none")
    assert_one_line_error(keel_here(capsys, "plan", str(cfg), "--device", "tpu"), "--device 'tpu'", "h100")
    assert_one_line_error(
        keel_here(capsys, "plan", str(cfg), "--set", "parallel.tp=3", "--nproc", "3"), "parallel.tp: 3"
    )
    assert_one_line_error(
        keel_here(capsys, "plan", str(cfg), "--nproc", "3"), "train.global_batch_size 8", "3 data-parallel"
    )


# Published per-GPU memory of torchtitan's Llama 3.1 runs on H100s (torch's peak reserved memory, GiB):
# pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md (torchtitan 9dec370, 2024-12), sequence length 8192.
TORCHTITAN = [
    (LLAMA3_8B, 8, 1, 2, "selective", 82.4),  # Table 1, FSDP, 8 GPUs, local batch 2
    (LLAMA3_8B, 128, 1, 2, "selective", 67.0),  # Table 3, FSDP, 128 GPUs, local batch 2
    (LLAMA3_70B, 32, 8, 16, "full", 71.9),  # Table 4, 2D: FSDP 32 x TP 8 (compile, Float8), local batch 16
]


def torchtitans(shape: MemoryShape, dim: int, vocab: int, tp: int) -> MemoryShape:
    """The Llama's memory as torchtitan trains it: bf16 weights (FSDP2's MixedPrecisionPolicy, the `bf16` precision),
    per-op selective checkpointing that keeps every other matmul's output (Keel's keeps all seven), and on one
    tensor-parallel rank a plain cross-entropy over bf16 logits (Keel fuses it with the output projection): the
    norm's one fp32 copy, its bf16 output and the projection's input, and the logits, their fp32 copy and
    log-softmax, then two fp32 gradients as wide."""
    shape = replace(shape, matmuls=shape.matmuls[::2])
    if tp > 1:  # loss_parallel, as Keel
        return shape
    return replace(
        shape,
        head=8 * dim,
        loss_forward=10 * vocab,
        loss_backward=12 * vocab,
        loss_forward_fixed=0.0,
        loss_backward_fixed=0.0,
    )


@pytest.mark.parametrize(("model", "shards", "tp", "batch", "checkpointing", "reported"), TORCHTITAN)
def test_memory_matches_torchtitans_published_figures(model, shards, tp, batch, checkpointing, reported):
    spec, args = model_args({"name": "llama", "max_seq_len": 8192, **model})
    shape = torchtitans(spec.memory(args, tp, "bf16", "cuda", batch * 8192), args.dim, args.vocab_size, tp)
    setup = Setup(1, shards, tp, 1, batch, 1, 8192, checkpointing, 0, "bf16")
    planned = estimate(shape, setup, framework=0.0).tensors / GIB
    # torch's reserved memory holds the allocator's cached blocks besides the tensors: expect the plan a little under.
    assert planned == pytest.approx(reported, rel=0.20), planned


@pytest.mark.parametrize(
    ("model", "batch"),
    [
        ({"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}, 16),  # the demo's model and batch
        pytest.param({"dim": 512, "n_layers": 4, "n_heads": 8, "n_kv_heads": 4}, 8, marks=pytest.mark.soak),  # wider
    ],
    ids=["demo", "wide"],
)
def test_the_planned_peak_rss_of_a_cpu_run_is_within_15_percent_of_the_measured(tmp_path, dataset, model, batch):
    model = {**model, "vocab_size": 8192, "max_seq_len": 256}
    train = {"steps": 6, "seq_len": 256, "global_batch_size": batch}
    cfg = tiny_config(tmp_path / "c.toml", dataset, model=model, train=train)
    assert run_keel("train", str(cfg), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    plan = next(e for e in read_jsonl(run / "events.jsonl") if e["event"] == "plan")
    measured = max(r["memory_rss_peak_gb"] for r in read_metrics(run) if "memory_rss_peak_gb" in r)
    assert plan["peak_memory_gb"] == pytest.approx(measured, rel=0.15), (plan, measured)
    page = write_report(run).read_text()  # keel report sets the plan beside the run
    assert 'id="plan"' in page and "<th>memory_rss_peak_gb</th>" in page


def test_the_search_offers_only_layouts_keel_train_accepts(tmp_path):
    # A pipeline of 2 stages (1f1b, 2 pipeline micro-batches): a micro-batch of 1 sequence does not split into them.
    loaded = load_config(config(tmp_path / "pp.toml", LLAMA3_8B, parallel={"pp": 2}))
    model = planned_model(loaded)
    found = list(variants(loaded, 8, layout_allowed(model)))
    for variant in found:
        check_layout(variant, model.spec, model.args)  # a ConfigError here: a layout the preflight would refuse
    pipelined = [v for v in found if v.parallel.pp == 2]
    assert pipelined and all(v.train.micro_batch_size % 2 == 0 for v in pipelined)
    assert any(v.parallel.pp == 1 and v.train.micro_batch_size == 1 for v in found)


def test_a_gpu_is_planned_as_the_variant_torch_names_with_the_memory_it_sees():
    h200 = gpu_device("NVIDIA H200", 132, 143771 * 2**20)
    assert (h200.kind, h200.name, h200.bf16) == ("h200", "H200 SXM", 989e12)
    pcie = gpu_device("NVIDIA H100 PCIe", 114, 80 * GIB)
    assert (pcie.name, pcie.bf16, pcie.watts) == ("H100 PCIe", 756e12, 350.0)
    mig = gpu_device("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 40 * GIB)
    assert mig.memory == 40 * GIB and mig.bf16 == pytest.approx(989e12 * 60 / 132)
    assert gpu_device("Tesla T4", 40, 16 * GIB) is None


def test_a_pipeline_with_replicas_is_planned_as_fsdp_with_its_stage_gathered():
    spec, args = model_args({"name": "llama", **LLAMA3_8B, "max_seq_len": 8192})
    shape = spec.memory(args, 1, "autocast", "cuda", 2 * 8192)
    pipelined = Setup(2, 1, 1, 2, 2, 2, 8192, "full", 0, "autocast")  # dp_replicate 2 x pp 2: HSDP of one shard
    assert pipelined.fsdp and not pipelined.ddp
    plain = Setup(2, 1, 1, 1, 2, 2, 8192, "full", 0, "autocast")
    assert plain.ddp and not plain.fsdp
    blocks = args.n_layers // 2
    gathered = estimate(shape, pipelined, framework=0.0).buffers
    assert gathered == pytest.approx(4 * (shape.outer_params / 2 + blocks * shape.block_params))
