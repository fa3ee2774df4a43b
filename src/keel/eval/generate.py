"""Sampling text from a trained model: temperature and top-k, one token at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keel.checkpoint.inference import load_model
from keel.data.tokenizer import eos_id, load_tokenizer
from keel.rundir import RunDir


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    *,
    max_seq_len: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt` (token ids) by up to `max_new_tokens` sampled tokens; returns only the new ones."""
    model.eval()
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -max_seq_len:])[0, -1].float()
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = float("-inf")
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if token == stop_token:
            break
        new.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
    return new


def sample_text(
    run_dir: Path, prompt: str, max_tokens: int, *, temperature: float = 0.8, step: int | None = None, seed: int = 0
) -> str:
    """Load the run's newest (or given) checkpoint in this process and continue `prompt`."""
    model, cfg = load_model(run_dir, step)
    tokenizer = load_tokenizer(RunDir(run_dir).tokenizer)
    ids = tokenizer.encode(prompt).ids
    new = generate(
        model,
        ids,
        max_tokens,
        max_seq_len=cfg.train.seq_len,
        temperature=temperature,
        stop_token=eos_id(tokenizer),
        generator=torch.Generator().manual_seed(seed),
    )
    return prompt + tokenizer.decode(new)
