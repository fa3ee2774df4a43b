"""`keel plan`'s output: a plan as lines of text, and the table of the fastest layouts that fit."""

from __future__ import annotations

from keel.plan.memory import Memory
from keel.plan.planner import GB, Plan, Planned, describe
from keel.units import duration

# What each part of the memory holds, for the breakdown's second column.
PARTS = {
    "parameters": "fp32 weights, this rank's shard",
    "gradients": "fp32, held at the peak",
    "optimizer": "AdamW's two fp32 moments",
    "activations": "kept by forward for backward",
    "transient": "logits and their gradients, recomputed blocks, autocast's weight copies",
    "buffers": "FSDP's gathered weights, DDP's buckets",
    "framework": "the process before the model",
    "allocator": "freed memory the allocator keeps",
}


def plan_lines(plan: Plan, model: Planned, nnodes: int, nproc: int) -> list[str]:
    """The plan of one layout: devices, memory with its breakdown, step time, throughput, and the run's totals."""
    s, m, speed, device = plan.setup, plan.memory, plan.speed, plan.device
    params = model.spec.num_params(model.args)
    lines = [
        f"model         {model.spec.name}, {params / 1e9:.3f} B parameters, vocabulary {model.args.vocab_size:,} "
        f"(from {model.vocab_from})",
        f"devices       {s.world} x {device.name} ({nnodes} machine{'s' if nnodes > 1 else ''} x {nproc})",
        f"layout        {describe(s)}, {s.accumulation} forward{'s' if s.accumulation > 1 else ''} per step, "
        f"{s.precision}",
        f"memory/rank   {m.total / GB:.2f} GB of {device.memory / GB:.1f} GB"
        f" ({'fits' if plan.fits else 'does NOT fit'}; peak at {m.peak_at})",
        *_breakdown(m, device.kind),
        f"step time     {speed.step_s:.3f} s: compute {speed.compute_s:.3f}, tensor parallel "
        f"{speed.tensor_parallel_s:.3f}, data parallel {speed.data_parallel_s:.3f}, pipeline bubble "
        f"{speed.bubble_s:.3f}",
        f"MFU           {plan.mfu:.1%} over the step; {speed.mfu:.1%} expected in compute ({device.expected.source})",
        f"throughput    {plan.tokens_per_s:,.0f} tokens/s, {plan.tokens_per_s * 86400 / 1e9:,.3f} B tokens/day",
        f"train.steps   {plan.steps:,} steps of {plan.tokens_per_step:,} tokens: {duration(plan.train_s)}, "
        f"{_amount(plan.device_hours)} device-hours",
        f"cost          ${plan.cost:,.2f} at ${plan.price:.2f} per device-hour",
        f"energy        {_amount(plan.energy_kwh)} kWh at {device.watts:.0f} W per device (rated: an upper estimate)",
    ]
    return lines


def _breakdown(m: Memory, kind: str) -> list[str]:
    notes = dict(PARTS)
    if kind == "cpu":
        notes["framework"] = "measured: this process's RSS with what a training process imports"
    else:
        notes["framework"] = "CUDA context, cuBLAS and NCCL (assumed, not measured)"
    return [f"  {name:12} {value / GB:9.3f} GB  {notes[name]}" for name, value in m.breakdown().items()]


def _amount(value: float) -> str:
    """A quantity with three significant digits below 100, whole above."""
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def search_table(plans: list[Plan]) -> list[str]:
    """The layouts that fit, fastest first: mesh, checkpointing, micro-batch, memory per rank, step time, tokens/s."""
    header = f"{'pp':>3} {'dp_rep':>6} {'dp_shard':>8} {'tp':>3}  {'checkpointing':13} {'micro':>5}"
    header += f" {'GB/rank':>8} {'step s':>8} {'tokens/s':>12} {'MFU':>6}"
    rows = [header]
    for p in plans:
        s = p.setup
        rows.append(
            f"{s.pp:>3} {s.dp_replicate:>6} {s.dp_shard:>8} {s.tp:>3}  {s.checkpointing:13} {s.micro_batch:>5}"
            f" {p.memory.total / GB:>8.2f} {p.speed.step_s:>8.3f} {p.tokens_per_s:>12,.0f} {p.mfu:>6.1%}"
        )
    return rows
