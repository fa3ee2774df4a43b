"""ModelSpec: what Keel needs to know about a model family, so the trainer never has to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HFMapping:
    """How a model family maps to a Hugging Face transformers architecture, for export and import."""

    config: Callable[[Any], dict[str, Any]]  # args -> config.json's architecture and shape keys
    to_hf: Callable[[Any, StateDict], StateDict]  # (args, Keel state dict) -> HF names and layouts
    from_hf: Callable[[Any, StateDict], StateDict]  # (args, HF state dict) -> Keel's; the exact inverse of to_hf
    checked: dict[str, str]  # config.json key (dotted for nested) -> the [model] key it must agree with on import
    # config.json -> why the model cannot reproduce it (a feature it lacks), or None; checked before any weight loads
    unsupported: Callable[[dict[str, Any]], str | None] = lambda config: None


@dataclass(frozen=True)
class PipelineSplit:
    """Where pipeline parallel cuts a model: its blocks (a ModuleDict keyed by index, so names survive the cut),
    and the submodules only the first or only the last stage keeps (the model's forward skips those it lacks)."""

    blocks: str
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """Everything Keel needs to know about a model family, without the trainer knowing it."""

    name: str
    args_cls: type[BaseModel]  # the [model] keys (besides `name`), each with a one-line description
    build: Callable[[Any], nn.Module]  # args -> model with initialised weights (torch's seed, default device)
    num_params: Callable[[Any], int]  # closed-form parameter count
    flops_per_token: Callable[[Any, int], float]  # (args, seq_len) -> training FLOPs per token, forward + backward
    shard_units: Callable[[nn.Module], list[nn.Module]]  # submodules FSDP wraps one by one (the blocks)
    # (model materialised after a meta build and sharding, seed) -> weights, the same however it is sharded
    init_weights: Callable[[nn.Module, int], None]
    # (model on the meta device, the tensor-parallel DeviceMesh) -> its weights split over that mesh, in place
    tensor_parallel: Callable[[nn.Module, Any], None]
    hf: HFMapping | None = None  # Hugging Face export/import; None where the family has no HF counterpart
    pipeline: PipelineSplit | None = None  # how pipeline parallel splits it; None: it does not
    # linear layers kept out of float8 (train.fp8): the output projection, whose logits need the precision
    high_precision: tuple[str, ...] = ()


def fill_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor `full` into a parameter (a DTensor's shard, or all of it)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)
