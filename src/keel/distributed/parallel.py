"""Parallelism applied to a model from outside it: activation checkpointing, compile, then DDP or FSDP2."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from keel.config import Config
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.distributed.env import DistEnv


def parallelize(
    model: nn.Module, blocks: Callable[[nn.Module], list[nn.Module]], cfg: Config, env: DistEnv
) -> nn.Module:
    """Prepare a freshly built model for training, in torchtitan's order: activation checkpointing of its blocks,
    torch.compile of each block, then data parallelism over all ranks."""
    apply_activation_checkpointing(model, blocks, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        for block in blocks(model):
            block.compile()
    return apply_data_parallel(model, cfg.parallel.dp, env, blocks)


def apply_data_parallel(
    model: nn.Module, mode: str, env: DistEnv, shard_units: Callable[[nn.Module], list[nn.Module]]
) -> nn.Module:
    """Wrap `model` for data parallelism (`parallel.dp`): ddp replicates, fsdp shards each unit, then the root."""
    if not env.distributed:
        return model
    if mode == "ddp":
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-steps; sync on the last one."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients over all ranks (a tensor on every rank: the same value everywhere)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


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


def grad_norms_by_group(model: nn.Module) -> dict[str, float]:
    """The L2 norm of each parameter group's gradients, over all ranks' shards (one small all-reduce under FSDP)."""
    grads: dict[str, list[torch.Tensor]] = {}
    sharded = False
    for name, param in unwrap(model).named_parameters():
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor):
            sharded = sharded or any(p.is_shard() for p in grad.placements)
            grad = grad.to_local()
        grads.setdefault(parameter_group(name), []).append(grad.detach())
    if not grads:
        return {}
    names = sorted(grads)
    # Multi-tensor norms (the kernels clip_grad_norm_ uses), squared so that shards and groups add up.
    squares = torch.stack([torch.nn.utils.get_total_norm(grads[n]).float() for n in names]).square()
    if sharded and dist.is_initialized():
        dist.all_reduce(squares)  # each rank holds a disjoint shard
    return dict(zip(names, squares.sqrt().tolist(), strict=True))
