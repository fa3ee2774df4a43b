"""Tokens/s of Keel's trainer against a plain Hugging Face transformers training loop on the same Llama, in one run.

    PYTHONPATH=src .venv/bin/python bench/vs_hf.py [--steps 20] [--repeats 5] [--hf-precision fp32|bf16]
        [--keel-precision auto|fp32|bf16]

Both train the identical model (Keel's initial weights exported to a LlamaForCausalLM with SDPA attention) on the
identical batches (Keel's loader; the HF loop gets them already in memory), one process, the same threads, the
repeats interleaved (alternating which goes first). Keel runs with `train.precision = "auto"` and its defaults;
the HF loop is what a user writes: fp32 (or, with --hf-precision bf16, bf16 autocast), torch.optim.AdamW with its
defaults, gradient clipping, a cosine schedule. Prints the median tokens/s of each and the ratio Keel / HF, and
the same per second of the process's CPU time, which the load of other jobs on a shared machine distorts less.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import transformers
from common import MODEL, Clock, run_overrides, stdlib_dataset

from keel.config import Config
from keel.config_toml import load_config
from keel.data.loader import Batch
from keel.distributed.env import init_distributed
from keel.models import model_args
from keel.models.loss import next_token_loss
from keel.train.preflight import start_run
from keel.train.trainer import Trainer

BATCH, SEQ = 8, 256


def keel_trainer(root: Path, dataset: Path, steps: int, index: int, precision: str = "auto") -> Trainer:
    cfg, _ = start_run(load_config(None, run_overrides(dataset, root / f"run{index}", steps, precision)))
    return Trainer(cfg, init_distributed("cpu"))


def hf_model(trainer: Trainer) -> transformers.LlamaForCausalLM:
    """A LlamaForCausalLM (SDPA attention) holding the Keel trainer's current weights, through Keel's HF mapping."""
    spec, args = model_args(trainer.cfg.model_section())
    config = transformers.LlamaConfig(**spec.hf.config(args), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    state = spec.hf.to_hf(args, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.train()


def keel_tokens_per_s(trainer: Trainer, steps: int) -> tuple[float, float, float]:
    trainer.train_step(1)  # warm-up, as the HF loop gets
    clock = Clock()
    for step in range(2, steps + 1):
        outcome = trainer.train_step(step)
    return *clock.rates((steps - 1) * BATCH * SEQ), float(outcome.loss)


def hf_tokens_per_s(
    model: transformers.LlamaForCausalLM, batches: list[Batch], cfg: Config, bf16: bool
) -> tuple[float, float, float]:
    """The loop a user writes around LlamaForCausalLM: loss from labels, backward, clip, AdamW, schedule."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, o.warmup_steps, cfg.train.steps)

    def step(batch: Batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            # shift_labels: the targets are already the next tokens (the same 256 targets per row as Keel's).
            loss = model(input_ids=batch.inputs, labels=batch.targets, shift_labels=batch.targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(batches[0])
    clock = Clock()
    for batch in batches[1:]:
        loss = step(batch)
    return *clock.rates((len(batches) - 1) * BATCH * SEQ), loss


def check_same_model(trainer: Trainer, model: transformers.LlamaForCausalLM, batch: Batch) -> tuple[float, float]:
    """Both models' fp32 loss on the first batch (no update): the same weights give the same loss."""
    with torch.no_grad():
        keel = float(next_token_loss(trainer.model(batch.inputs), batch.targets))
        hf = float(model(input_ids=batch.inputs, labels=batch.targets, shift_labels=batch.targets).loss)
    assert abs(keel - hf) < 1e-4 * keel, f"the models differ: Keel loss {keel}, HF loss {hf}"
    return keel, hf


def repeat(root: Path, dataset: Path, opts: argparse.Namespace, index: int) -> tuple[tuple, tuple, Trainer]:
    """One Keel run and one HF run from the same weights on the same batches; which goes first alternates."""
    trainer = keel_trainer(root, dataset, opts.steps, index, opts.keel_precision)
    model = hf_model(trainer)
    batches = [trainer.loader.batch_at(s)[0] for s in range(opts.steps)]  # one micro-batch per step
    if index == 0:
        print(
            "same weights, fp32 loss on batch 0: Keel {:.6f}, HF {:.6f}".format(
                *check_same_model(trainer, model, batches[0])
            )
        )
        print(f"Keel's precision: {trainer.precision.reason}")
    bf16 = opts.hf_precision == "bf16"
    if index % 2:
        hf = hf_tokens_per_s(model, batches, trainer.cfg, bf16)
        return keel_tokens_per_s(trainer, opts.steps), hf, trainer
    keel = keel_tokens_per_s(trainer, opts.steps)
    return keel, hf_tokens_per_s(model, batches, trainer.cfg, bf16), trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--keel-precision", choices=["auto", "fp32", "bf16"], default="auto")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = stdlib_dataset(root)
        runs = [repeat(root, dataset, opts, i) for i in range(opts.repeats)]
    trainer = runs[-1][2]
    keel, hf = [r[0] for r in runs], [r[1] for r in runs]
    vocab = model_args(trainer.cfg.model_section())[1].vocab_size
    print(f"model {MODEL} vocab {vocab}, batch {BATCH}x{SEQ}, {torch.get_num_threads()} threads, {opts.steps} steps")
    print(f"last loss: HF {hf[-1][2]:.3f}, Keel {keel[-1][2]:.3f}")
    for i, what in ((0, "tokens/s"), (1, "tokens per CPU-second")):
        k, h = statistics.median(r[i] for r in keel), statistics.median(r[i] for r in hf)
        ratios = ", ".join(f"{a[i] / b[i]:.2f}" for a, b in zip(keel, hf, strict=True))
        print(
            f"{what} (median of {opts.repeats}): HF loop ({opts.hf_precision}) {h:,.0f}, "
            f"Keel ({trainer.precision.name}) {k:,.0f}; Keel / HF {k / h:.3f} (per repeat: {ratios})"
        )


if __name__ == "__main__":
    main()
