"""The plan's memory model against torch: the Llama's saved tensors per token (saved-tensor hooks, also under tensor
parallel with real gloo processes), and a step's peak tensor bytes (torch's MemTracker) in every checkpointing mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from keel.config import OptimConfig
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.models import model_args
from keel.plan.memory import Setup, estimate
from keel.train.optim import build_optimizer

MODEL = {"name": "llama", "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128}
PROBE = Path(__file__).parent / "plan_probe.py"


def saved_per_token(precision: str, vocab: int = 512, batch: int = 2, seq: int = 128) -> dict[str, float]:
    """Bytes per token autograd saves in block 0 and in the head (weight copies left out), by saved-tensor hooks."""
    spec, args = model_args({**MODEL, "vocab_size": vocab})
    torch.manual_seed(0)
    model = spec.build(args)
    if precision == "bf16":  # bf16 weights and fp32 buffers, as FSDP2's MixedPrecisionPolicy computes with
        for param in model.parameters():
            param.data = param.data.bfloat16()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["embedding"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # a matmul's weight (a parameter, or autocast's cast of one) is 2-d and as large as the weight, not per token;
        # the rotary tables (complex, per position, shared by the batch) the plan leaves out
        is_weight = storage.data_ptr() in weights or (t.ndim == 2 and t.shape[0] != batch * seq)
        if not is_weight and not t.is_complex():
            seen.setdefault(storage.data_ptr(), (storage.nbytes(), where[0]))
        return t

    for i, block in enumerate(model.layers.values()):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block{i}"))
    model.norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head"))
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(tokens[:, :-1], targets=tokens[:, 1:])  # the loss too, as training computes it
    totals: dict[str, float] = {}
    for nbytes, name in seen.values():
        totals[name] = totals.get(name, 0) + nbytes / (batch * seq)
    return totals


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_a_blocks_saved_tensors_per_token_are_what_torch_saves(precision):
    spec, args = model_args({**MODEL, "vocab_size": 512})
    shape = spec.memory(args, 1, precision, "cpu", 2 * 128)
    measured = saved_per_token(precision)
    assert measured["block0"] == pytest.approx(shape.block, rel=0.01)
    # The head: the final norm, and what the fused loss keeps per token (the hidden states' gradient).
    assert measured["head"] == pytest.approx(shape.head + shape.loss_forward, rel=0.01)


def test_tensor_parallel_and_fsdp_hold_what_the_plan_says():
    # Two gloo processes: the Llama's tensor-parallel plan (sequence and loss parallel, tp = 2) under saved-tensor
    # hooks; a training step sharded by Keel's parallelize (FSDP2, dp_shard = 2) under torch's FSDPMemTracker.
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(PROBE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    saved = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("saved ")]
    assert {row[0] for row in saved} == {"fp32", "autocast"}, out.stdout
    for precision, part, measured, planned in saved:
        assert float(measured) == pytest.approx(float(planned), rel=0.02), (precision, part)
    sharded = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("fsdp ")]
    assert {row[0] for row in sharded} == {"none", "full"}, out.stdout
    for mode, measured, planned in sharded:
        assert float(planned) == pytest.approx(float(measured), rel=0.05), mode


def peak(mode: str, every: int, vocab: int, batch: int, accumulate: int = 1, precision: str = "fp32") -> tuple:
    """(MemTracker's peak of a whole training step, the plan's tensor bytes, the plan's peak moment)."""
    spec, args = model_args({**MODEL, "vocab_size": vocab})
    torch.manual_seed(0)
    model = spec.build(args)
    apply_activation_checkpointing(model, spec.shard_units, mode, every)
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    tokens = torch.randint(0, vocab, (batch, 129))

    def step(tracker: MemTracker | None = None) -> None:  # as Keel's trainer steps
        for _ in range(accumulate):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
                loss = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss.backward()
            if tracker is not None:
                tracker.reset_mod_stats()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from the first step on, as in training
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step(tracker)
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    setup = Setup(1, 1, 1, 1, batch, accumulate, 128, mode, every, precision)
    planned = estimate(spec.memory(args, 1, precision, "cpu", batch * 128), setup, framework=0.0)
    return measured, planned.tensors, planned.peak_at


@pytest.mark.parametrize(
    ("mode", "every", "vocab", "batch", "accumulate", "precision", "moment"),
    [
        ("none", 0, 4096, 4, 1, "fp32", "loss"),
        ("selective", 2, 4096, 4, 1, "fp32", "loss"),
        ("full", 0, 256, 4, 1, "fp32", "block"),
        ("none", 0, 4096, 2, 2, "fp32", "loss"),
        ("full", 0, 32000, 2, 1, "fp32", "loss"),
        ("full", 0, 4096, 1, 1, "fp32", "block"),
        ("selective", 0, 4096, 4, 1, "autocast", "loss"),
    ],
)
def test_a_steps_peak_tensor_bytes_are_what_torch_tracks(mode, every, vocab, batch, accumulate, precision, moment):
    measured, planned, peak_at = peak(mode, every, vocab, batch, accumulate, precision)
    assert peak_at == moment
    assert planned == pytest.approx(measured, rel=0.05), (measured / 2**20, planned / 2**20)
