"""The training objective: next-token cross-entropy, for the training step and for validation alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from keel.data.loader import Batch


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all tokens, computed in fp32 whatever the logits' dtype.

    Logits split over the vocabulary (tensor parallel, a DTensor) need torch's loss_parallel context around this
    and the backward; the loss comes back as a plain tensor holding the whole value on every rank.
    """
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1))
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def batch_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The model's next-token loss on one batch, moved to `device`; positions and documents go to it when present.

    The model computes the loss itself from the targets (through its forward, so FSDP and DDP see the call), which
    lets it fuse the output projection with the loss instead of returning logits.
    """
    batch = batch.to(device)
    return model(batch.inputs, positions=batch.positions, documents=batch.documents, targets=batch.targets)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, S] in fp32, a plain tensor (vocabulary-split logits: inside loss_parallel)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1), reduction="none")
    return (loss.full_tensor() if isinstance(loss, DTensor) else loss).view_as(targets)


def token_losses(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Per-token next-token cross-entropy [B, S] of one batch, for losses grouped by where each token came from."""
    batch = batch.to(device)
    logits = model(batch.inputs, positions=batch.positions, documents=batch.documents)
    return token_cross_entropy(logits, batch.targets)
