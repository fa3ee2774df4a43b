"""Cross-entropy of next-token prediction, for training and for validation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))


@torch.no_grad()
def validation_loss(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device, autocast
) -> torch.Tensor:
    """Mean loss of `model` over this rank's validation batches (the caller averages over ranks)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for inputs, targets in batches:
        with autocast():
            logits = model(inputs.to(device, non_blocking=True))
        total += next_token_loss(logits, targets.to(device, non_blocking=True))
        count += 1
    model.train(was_training)
    return total / max(count, 1)
