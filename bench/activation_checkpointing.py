"""Activation checkpointing on the benchmark Llama: peak memory of a training step and its time, per mode,
as ratios against no checkpointing measured in the same run.

Usage: .venv/bin/python bench/activation_checkpointing.py [--steps 10] [--repeats 3] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import MODEL
from torch.distributed._tools.mem_tracker import MemTracker

from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.models import model_args
from keel.models.loss import next_token_loss

MODES = [("none", 0), ("selective", 0), ("selective", 2), ("full", 0)]
VOCAB = 8192


def build(mode: str, every: int, seq_len: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    spec, args = model_args({**MODEL, "vocab_size": VOCAB, "max_seq_len": seq_len})
    torch.manual_seed(0)
    model = spec.build(args)
    apply_activation_checkpointing(model, spec.shard_units, mode, every)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    next_token_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_bytes(mode: str, every: int, tokens: torch.Tensor) -> int:
    model, optimizer = build(mode, every, tokens.shape[1] - 1)
    step(model, optimizer, tokens)  # the optimizer's state exists from here on, as in training
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step(model, optimizer, tokens)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def seconds_per_step(mode: str, every: int, tokens: torch.Tensor, steps: int) -> float:
    model, optimizer = build(mode, every, tokens.shape[1] - 1)
    step(model, optimizer, tokens)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, optimizer, tokens)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=512)
    opts = parser.parse_args()
    tokens = torch.randint(0, VOCAB, (8, opts.seq_len + 1), generator=torch.Generator().manual_seed(0))
    peaks = {m: peak_bytes(*m, tokens) for m in MODES}
    times = {m: [] for m in MODES}
    for _ in range(opts.repeats):  # interleaved, so a noisy neighbour slows every mode alike
        for m in MODES:
            times[m].append(seconds_per_step(*m, tokens, opts.steps))
    base_peak, base_time = peaks[MODES[0]], statistics.median(times[MODES[0]])
    print(
        f"Llama d{MODEL['dim']} L{MODEL['n_layers']}, batch 8 x {opts.seq_len}, fp32, {torch.get_num_threads()} threads"
    )
    for m in MODES:
        name = m[0] if not m[1] else f"{m[0]} (every {m[1]}nd block)"
        name = "selective (per op)" if m == ("selective", 0) else name
        t = statistics.median(times[m])
        print(
            f"{name:28} peak {peaks[m] / 2**20:8.1f} MiB ({peaks[m] / base_peak:.2f}x)   "
            f"step {t * 1000:7.1f} ms ({t / base_time:.2f}x)"
        )


if __name__ == "__main__":
    main()
