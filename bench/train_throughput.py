"""Tokens/s of Keel's trainer against a plain PyTorch loop on the same model, batch and precision, in one run.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--precision bf16] [--repeats 3]

Prints the median tokens/s of each and their ratio (Keel / plain), MFU against the measured matmul ceiling, and
the same per second of the process's CPU time (less distorted by other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import MODEL, Clock, run_overrides, stdlib_dataset

from keel.config_toml import load_config
from keel.data.manifest import load_manifest
from keel.distributed.env import init_distributed
from keel.models import model_args
from keel.models.loss import next_token_loss
from keel.observe.mfu import measured_matmul_flops
from keel.train.preflight import start_run
from keel.train.trainer import Trainer


def keel_tokens_per_s(root: Path, dataset: Path, steps: int, precision: str, index: int) -> tuple[float, float]:
    overrides = run_overrides(dataset, root / f"run{index}", steps, precision)
    cfg, _ = start_run(load_config(None, overrides))
    trainer = Trainer(cfg, init_distributed("cpu"))
    trainer.train_step(1)  # warm-up, as the plain loop gets
    clock = Clock()
    for step in range(2, steps + 1):
        trainer.train_step(step)
    return clock.rates((steps - 1) * 8 * 256)


def plain_tokens_per_s(vocab: int, steps: int, precision: str) -> tuple[float, float]:
    spec, args = model_args({**MODEL, "vocab_size": vocab})
    torch.manual_seed(0)
    model = spec.build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    tokens = torch.randint(0, vocab, (8, 257))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    clock = Clock()
    for _ in range(steps - 1):
        step()
    return clock.rates((steps - 1) * 8 * 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        vocab = load_manifest(dataset).tokenizer.vocab_size
        keel, plain = [], []
        for i in range(opts.repeats):
            plain.append(plain_tokens_per_s(vocab, opts.steps, opts.precision))
            keel.append(keel_tokens_per_s(root, dataset, opts.steps, opts.precision, i))
    spec, args = model_args({**MODEL, "vocab_size": vocab})
    flops = spec.flops_per_token(args, 256)
    ceiling = measured_matmul_flops(torch.bfloat16 if opts.precision == "bf16" else torch.float32)
    k, p = statistics.median(r[0] for r in keel), statistics.median(r[0] for r in plain)
    print(f"model d256 L4 vocab {vocab}, batch 8x256, {opts.precision}, {torch.get_num_threads()} threads")
    print(f"plain PyTorch loop: {p:,.0f} tokens/s (median of {opts.repeats}), MFU {flops * p / ceiling:.1%}")
    print(f"Keel trainer:       {k:,.0f} tokens/s (median of {opts.repeats}), MFU {flops * k / ceiling:.1%}")
    print(f"ratio Keel / plain: {k / p:.3f}   (matmul ceiling {ceiling / 1e9:.1f} GFLOP/s)")
    k, p = statistics.median(r[1] for r in keel), statistics.median(r[1] for r in plain)
    print(f"per CPU-second: plain {p:,.0f}, Keel {k:,.0f} tokens; ratio Keel / plain {k / p:.3f}")


if __name__ == "__main__":
    main()
