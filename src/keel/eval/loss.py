"""Cross-entropy of next-token prediction, for training and for validation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from keel.data.loader import Batch


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))


def batch_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The model's next-token loss on one batch, moved to `device`; positions and documents go to it when present."""
    batch = batch.to(device)
    logits = model(batch.inputs, positions=batch.positions, documents=batch.documents)
    return next_token_loss(logits, batch.targets)


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[Batch], device: torch.device, autocast) -> torch.Tensor:
    """Mean loss of `model` over this rank's validation batches (the caller averages over ranks)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in batches:
        with autocast():
            total += batch_loss(model, batch, device)
        count += 1
    model.train(was_training)
    return total / max(count, 1)
