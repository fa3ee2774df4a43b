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
class MemoryShape:
    """What a model holds on one rank, for `keel plan`: parameter counts, and bytes kept for backward.

    Per-token figures are bytes for one token of a rank's micro-batch under a precision (`fp32`, `autocast`: bf16
    autocast over fp32 weights, `bf16`: bf16 weights as FSDP2's MixedPrecisionPolicy gives) and a tensor-parallel
    degree; they count what autograd saves, as torch's saved-tensor hooks list it.
    """

    n_blocks: int
    block_params: int  # one block's parameters (all ranks together)
    outer_params: int  # the parameters outside the blocks: embedding, final norm, output projection
    block: float  # one block without activation checkpointing: every tensor its backward needs
    block_input: float  # one block's input: all that a fully checkpointed block keeps
    matmuls: tuple[float, ...]  # one block's matmul outputs in forward order (op-level selective keeps them)
    attention: float  # one block's attention output and statistics (op-level selective keeps them too)
    head: float  # what the final norm keeps (and the output projection, where it keeps its input)
    loss_forward: float  # per token, at the loss's peak in forward: logits and their copies, or what a fused loss keeps
    loss_backward: float  # per token, at the start of backward: what the loss kept and the gradients it makes
    loss_forward_fixed: float = 0.0  # bytes besides, whatever the tokens (a fused loss: weight-sized tensors)
    loss_backward_fixed: float = 0.0
    block_weight_casts: float = 0.0  # bytes of one block's weight copies autocast keeps from forward to backward
    head_weight_casts: float = 0.0  # the same for the output projection


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
    # (args, tensor-parallel degree, precision, device type, tokens per micro-batch) -> what it holds in memory, for
    # `keel plan`; None: not planned
    memory: Callable[[Any, int, str, str, int], MemoryShape] | None = None


def fill_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the whole tensor `full` into a parameter (a DTensor's shard, or all of it)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)
