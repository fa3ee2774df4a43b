"""Validation loss: the training objective on held-out batches, without gradients."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from keel.data.loader import Batch
from keel.models.loss import batch_loss


@torch.no_grad()
def validation_loss(
    model: nn.Module, batches: Iterable[Batch], device: torch.device, autocast: Callable[[], AbstractContextManager]
) -> torch.Tensor:
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
