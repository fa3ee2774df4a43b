"""The step runner: the trainer's one view of how the model is parallelised.

It runs the forward and backward of one batch on this rank's part of the model and returns the batch's loss, the
same on every rank; it measures and clips the gradients over the whole model, wherever its parts live. `parallelize`
picks the runner: the whole model on every rank (DDP, FSDP, tensor parallel), or a pipeline schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from keel.data.loader import Batch
from keel.distributed.grads import clip_grads, grad_norm, grad_norms_by_group
from keel.distributed.mesh import Mesh
from keel.models.loss import batch_loss, token_losses

Context = Callable[[], contextlib.AbstractContextManager]
Phase = Callable[[str], contextlib.AbstractContextManager]  # the step timer's phase("forward"), ...


def loss_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    """Around the loss and its backward: tensor parallel computes the loss on vocabulary shards (loss parallel)."""
    return loss_parallel() if mesh.layout.tp > 1 else contextlib.nullcontext()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


class StepRunner:
    """Forward and backward of a batch on this rank's part of the model; gradient norms over the whole model."""

    def __init__(
        self,
        model: nn.Module,
        parts: list[nn.Module],
        mesh: Mesh,
        device: torch.device,
        autocast: Context,
        groups: list[str],
        pp_group: dist.ProcessGroup | None = None,
    ):
        self.model = model  # this rank's parameters under their global names: what the optimizer and checkpoints see
        self.parts = parts  # the modules this rank runs: the whole model, or its pipeline stages
        self.mesh, self.device, self.autocast = mesh, device, autocast
        self.groups, self.pp_group = groups, pp_group  # every parameter group of the whole model, for the metrics

    def forward_backward(self, batch: Batch, accumulate: int, sync: bool, phase: Phase) -> torch.Tensor:
        """Add the gradients of the batch's loss / `accumulate` (one of that many micro-batches of a step), reduced
        over data parallel when `sync`; return the loss, detached, the same on every rank."""
        raise NotImplementedError

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """Around a forward pass of the whole model and its loss: autocast, and loss parallel under tensor parallel."""
        with loss_context(self.mesh), self.autocast():
            yield

    def _token_losses(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Per-token losses [B, S] of one batch, forward only, in evaluation mode, the same on every rank of a
        pipeline (validation, per source)."""
        modes = [part.training for part in self.parts]
        for part in self.parts:
            part.eval()
        try:
            return self._token_losses(batch)
        finally:
            for part, mode in zip(self.parts, modes, strict=True):
                part.train(mode)

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm over every rank and stage (a DTensor under FSDP; see grads.norm_value)."""
        return grad_norm(self.model, self.pp_group)

    def clip(self, max_norm: float, norm: torch.Tensor) -> None:
        """Scale the gradients so that their global norm `norm` is at most `max_norm` (0: leave them)."""
        clip_grads(self.model, max_norm, norm)

    def grad_norms_by_group(self) -> dict[str, float]:
        """Each parameter group's gradient norm over every rank and stage."""
        return grad_norms_by_group(self.model, self.groups, self.pp_group)


class LocalStep(StepRunner):
    """The whole model on every rank: forward, then backward, gradient all-reduce only on the last micro-batch."""

    def forward_backward(self, batch: Batch, accumulate: int, sync: bool, phase: Phase) -> torch.Tensor:
        with gradient_sync(self.model, enabled=sync), loss_context(self.mesh):
            with phase("forward"), self.autocast():
                loss = batch_loss(self.model, batch, self.device)
            with phase("backward"):
                (loss / accumulate).backward()
        return loss.detach()

    def _token_losses(self, batch: Batch) -> torch.Tensor:
        with self.forward_context():
            return token_losses(self.model, batch, self.device)
