"""Parallelism applied to a model from outside it: tensor parallel, activation checkpointing, compile, FSDP2 or DDP."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.nn.parallel import DistributedDataParallel

from keel.config import Config
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.distributed.env import DistEnv
from keel.distributed.mesh import Mesh
from keel.models.spec import ModelSpec


def parallelize(model: nn.Module, spec: ModelSpec, cfg: Config, env: DistEnv, mesh: Mesh) -> nn.Module:
    """Make a model built on the meta device ready to train, in torchtitan's order: tensor parallel, activation
    checkpointing, compile, FSDP2 on the data-parallel mesh; then allocate this rank's shards and initialise them
    (the same weights however they are sharded); DDP, which broadcasts real weights, wraps it last."""
    if mesh.layout.tp > 1:
        spec.tensor_parallel(model, mesh.device_mesh["tp"])
    apply_activation_checkpointing(model, spec.shard_units, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        for block in spec.shard_units(model):
            block.compile()
    replicate_only = mesh.layout.dp_shard == 1 and mesh.layout.tp == 1
    if mesh.layout.dp > 1 and not replicate_only:
        dims = ("dp_replicate", "dp_shard") if mesh.layout.dp_replicate > 1 else ("dp_shard",)
        dp_mesh = mesh.device_mesh[dims]  # two dimensions: HSDP, sharded within replicas, replicated across
        for unit in spec.shard_units(model):
            fully_shard(unit, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    model.to_empty(device=env.device)
    spec.init_weights(model, cfg.run.seed)
    if mesh.layout.dp > 1 and replicate_only:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        group = mesh.device_mesh["dp_replicate"].get_group()
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group)
    return model


def loss_context(mesh: Mesh) -> contextlib.AbstractContextManager:
    """Around the loss and its backward: tensor parallel computes the loss on vocabulary shards (loss parallel)."""
    return loss_parallel() if mesh.layout.tp > 1 else contextlib.nullcontext()


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
    """The L2 norm of each parameter group's gradients over all ranks' shards.

    Under FSDP alone (every gradient a shard on one mesh dimension) one small all-reduce adds the shards' squared
    norms; gradients replicated or partial on a tensor-parallel mesh are reduced by DTensor, a group at a time.
    """
    grads: dict[str, list[torch.Tensor]] = {}
    for name, param in unwrap(model).named_parameters():
        if param.grad is not None:
            grads.setdefault(parameter_group(name), []).append(param.grad.detach())
    if not grads:
        return {}
    names = sorted(grads)
    dtensors = [g for n in names for g in grads[n] if isinstance(g, DTensor)]
    if any(g.device_mesh.ndim > 1 or not all(p.is_shard() for p in g.placements) for g in dtensors):
        return {n: norm_value(torch.nn.utils.get_total_norm(grads[n])) for n in names}
    local = {n: [g.to_local() if isinstance(g, DTensor) else g for g in grads[n]] for n in names}
    # Multi-tensor norms (the kernels clip_grad_norm_ uses), squared so that shards and groups add up.
    squares = torch.stack([torch.nn.utils.get_total_norm(local[n]).float() for n in names]).square()
    if dtensors and dist.is_initialized():
        dist.all_reduce(squares)  # each rank holds a disjoint shard
    return dict(zip(names, squares.sqrt().tolist(), strict=True))
