"""Gradient norms over every rank's shards and pipeline stages, clipping, and the per-group norms the metrics log."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from keel.distributed.env import collective_device


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_norm(model: nn.Module, pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The global L2 norm of the gradients over all ranks (a tensor on every rank: the same value everywhere).

    Pipeline stages hold disjoint parameters: their squared norms add up over `pp_group`.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if pp_group is None:
        return norm
    squared = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square()
    dist.all_reduce(squared, group=pp_group)
    return squared.sqrt()


def clip_grads(model: nn.Module, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their global norm `norm` (from grad_norm) is at most `max_norm`; 0 leaves them."""
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, norm)


def norm_value(norm: torch.Tensor) -> float:
    """A norm from grad_norm as a float (gathering the shards' partial sums under FSDP)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def parameter_group(name: str) -> str:
    """A parameter's group: its name without layer indices and the trailing weight/bias (layers.attention.wq)."""
    # Layer indices and the activation-checkpointing wrapper are not part of what a parameter is.
    parts = [p for p in name.split(".") if not p.isdigit() and p != "_checkpoint_wrapped_module"]
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts.pop()
    return ".".join(parts)


def grad_norms_by_group(
    model: nn.Module, groups: list[str], pp_group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """The L2 norm of each parameter group's gradients over all ranks' shards and pipeline stages.

    `groups` names every group of the whole model, in one order on every rank, so that ranks holding different
    pipeline stages reduce the same vector. Where every gradient is a shard on one mesh dimension (FSDP alone) or
    whole (pipeline alone), the ranks hold disjoint pieces and one small all-reduce over all of them adds the squared
    norms; gradients replicated or partial on a tensor-parallel or replicate mesh are reduced by DTensor within the
    stage, a group at a time, then added over the pipeline.
    """
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for name, param in unwrap(model).named_parameters():
        if param.grad is not None:
            grads[parameter_group(name)].append(param.grad.detach())
    if not any(grads.values()):
        return {}
    dtensors = [g for gs in grads.values() for g in gs if isinstance(g, DTensor)]
    if any(g.device_mesh.ndim > 1 or not all(p.is_shard() for p in g.placements) for g in dtensors):
        device = collective_device() if dist.is_initialized() else "cpu"
        norms = [norm_value(torch.nn.utils.get_total_norm(grads[n])) if grads[n] else 0.0 for n in groups]
        squares = torch.tensor(norms, dtype=torch.float64, device=device).square()
        if pp_group is not None:
            dist.all_reduce(squares, group=pp_group)
    else:
        local = {n: [g.to_local() if isinstance(g, DTensor) else g for g in grads[n]] for n in groups}
        device = next(g for gs in local.values() for g in gs).device
        # Multi-tensor norms (the kernels clip_grad_norm_ uses), squared so that shards, stages and groups add up.
        zero = torch.zeros((), device=device)
        squares = torch.stack([torch.nn.utils.get_total_norm(local[n]).float() if local[n] else zero for n in groups])
        squares = squares.square()
        if (dtensors or pp_group is not None) and dist.is_initialized():
            dist.all_reduce(squares)  # each rank holds a disjoint shard of a disjoint stage
    return dict(zip(groups, squares.sqrt().tolist(), strict=True))
