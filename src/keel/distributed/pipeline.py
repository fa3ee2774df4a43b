"""Pipeline parallel: the model's blocks split into stages over the mesh's `pp` dimension, run by a schedule.

A stage is the model with the other blocks deleted, the embedding only on the first stage and the norm and output
only on the last (the model's PipelineSplit names them); the blocks are keyed by index, so every parameter keeps its
name and a checkpoint holds the same keys under any layout. Rank r of a pipeline runs stages r, r + pp, ...: one
for 1F1B and GPipe, several for interleaved 1F1B (a smaller bubble, for more sends). The schedule splits each batch
into `parallel.pp_microbatches` and interleaves their forwards and backwards across the stages; the last stage
computes the loss, which is broadcast so that every rank of the pipeline returns it.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from keel.config import ParallelConfig
from keel.data.loader import Batch
from keel.distributed.mesh import Mesh
from keel.distributed.step import Context, Phase, StepRunner, loss_context
from keel.models.loss import token_cross_entropy
from keel.models.spec import PipelineSplit

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_blocks(n_blocks: int, n_stages: int) -> list[list[int]]:
    """The block indices of each stage: contiguous runs, the extra blocks of an uneven split on the first stages."""
    size, extra = divmod(n_blocks, n_stages)
    bounds = [s * size + min(s, extra) for s in range(n_stages + 1)]
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def rank_stages(pp_rank: int, pp: int, per_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` runs: every pp-th, as the interleaved schedules expect."""
    return [pp_rank + k * pp for k in range(per_rank)]


def split_stage(model: nn.Module, split: PipelineSplit, blocks: list[int], first: bool, last: bool) -> nn.Module:
    """A copy of `model` (on the meta device: no memory) holding only `blocks`, and the first or last stage's parts."""
    stage = copy.deepcopy(model)
    container = getattr(stage, split.blocks)
    keep = {str(i) for i in blocks}
    for name in [name for name in container if name not in keep]:
        del container[name]
    for name in (() if first else split.first) + (() if last else split.last):
        setattr(stage, name, None)
    return stage


def merged(parts: list[nn.Module]) -> nn.Module:
    """One module holding every stage of this rank under the model's own names (for the optimizer, checkpoints and
    gradient norms; it never runs); a single stage is itself."""
    if len(parts) == 1:
        return parts[0]
    children: dict[str, nn.Module] = {}
    for part in parts:
        for name, child in part.named_children():
            if isinstance(child, nn.ModuleDict):  # the blocks: each stage holds some of them
                children.setdefault(name, nn.ModuleDict()).update(child)
            else:
                children[name] = child
    view = nn.Module()
    for name, child in children.items():
        view.add_module(name, child)
    return view


class PipelineStep(StepRunner):
    """Runs a batch through the pipeline schedule; every rank of the pipeline returns the last stage's loss."""

    def __init__(
        self,
        parts: list[nn.Module],
        stages: list[int],
        cfg: ParallelConfig,
        mesh: Mesh,
        device: torch.device,
        autocast: Context,
        groups: list[str],
    ):
        pp_mesh = mesh.device_mesh["pp"]
        super().__init__(merged(parts), parts, mesh, device, autocast, groups, pp_mesh.get_group())
        n_stages = cfg.pipeline_stages
        self.first, self.last = stages[0] == 0, stages[-1] == n_stages - 1
        self.last_rank = (n_stages - 1) % cfg.pp  # the pipeline rank that holds the last stage
        self.microbatches = cfg.pipeline_microbatches
        runs = [
            PipelineStage(part, index, n_stages, device, group=self.pp_group)
            for part, index in zip(parts, stages, strict=True)
        ]
        schedule = SCHEDULES[cfg.pp_schedule]
        # The loss function scales each micro-batch's loss itself (scale_grads=False), so gradients that several
        # schedule steps accumulate (train.micro_batch_size) are scaled once, by the loss.
        self.schedule = schedule(
            runs if schedule is ScheduleInterleaved1F1B else runs[0],
            n_microbatches=self.microbatches,
            loss_fn=self._loss,
            scale_grads=False,
        )
        self._train, self._divisor = True, 1

    def _loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._train:  # the last stage's forward took the targets and returned its mean loss
            return output / self._divisor
        return token_cross_entropy(output, targets)  # logits -> per-token losses

    def _run(self, batch: Batch, train: bool, divisor: int = 1) -> list[torch.Tensor]:
        """Run the schedule on one batch; on the rank of the last stage, each micro-batch's loss / divisor (train)
        or per-token losses (evaluation)."""
        batch = batch.to(self.device)
        B, T = batch.inputs.shape
        # Every stage takes the positions for its rotary tables: past the first, the hidden states it receives may
        # hold only a sequence shard (tensor parallel), which does not tell how long the sequence is.
        positions = batch.positions if batch.positions is not None else torch.arange(T, device=self.device)
        kwargs = {"positions": positions.expand(B, T)}
        if batch.documents is not None:
            kwargs["documents"] = batch.documents
        if train and self.last:
            # The last stage fuses its output projection with the loss (no logits); this rank's other stages
            # (interleaved) have no output projection and pass the targets by.
            kwargs["targets"] = batch.targets
        args = (batch.inputs,) if self.first else ()
        target = batch.targets if self.last else None
        losses: list[torch.Tensor] = []
        self._train, self._divisor = train, divisor
        with loss_context(self.mesh), self.autocast():
            run = self.schedule.step if train else self.schedule.eval
            run(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        return losses

    def forward_backward(self, batch: Batch, accumulate: int, sync: bool, phase: Phase) -> torch.Tensor:
        # Forwards and backwards interleave: the whole schedule counts as forward time. Each schedule step reduces
        # its stages' gradients over data parallel, so `sync` has nothing left to choose.
        divisor = self.microbatches * accumulate
        with phase("forward"):
            losses = self._run(batch, train=True, divisor=divisor)
        if self.last:
            loss = torch.stack(losses).detach().sum() * (divisor / self.microbatches)  # their mean
        else:
            loss = torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.last_rank)
        return loss

    def _token_losses(self, batch: Batch) -> torch.Tensor:
        losses = self._run(batch, train=False)
        if self.last:
            per_token = torch.cat(losses)
        else:
            per_token = torch.empty(batch.targets.shape, dtype=torch.float32, device=self.device)
        dist.broadcast(per_token, group=self.pp_group, group_src=self.last_rank)
        return per_token
