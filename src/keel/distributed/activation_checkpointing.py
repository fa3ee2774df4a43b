"""Activation checkpointing, applied to a model's blocks from outside it: recompute activations in backward.

full       every block keeps only its input; its activations are recomputed in backward
selective  every `every`-th block as in full, or (every = 0) per op in every block: the outputs of matmuls and
           attention, the expensive ops, are kept, and everything cheap (norms, activations, RoPE) recomputed
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

aten = torch.ops.aten
# The ops whose outputs op-level selective checkpointing keeps: what costs FLOPs to recompute.
KEPT_OPS = {
    getattr(aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(aten, name)
}


def _keep_expensive(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(
    model: nn.Module, blocks: Callable[[nn.Module], list[nn.Module]], mode: str, every: int
) -> None:
    """Wrap the model's blocks in place for `train.activation_checkpointing` (none, selective, full)."""
    if mode == "none":
        return
    for i, block in enumerate(blocks(model)):
        if mode == "selective" and every and (i + 1) % every:
            continue
        if mode == "selective" and not every:
            context = partial(create_selective_checkpoint_contexts, _keep_expensive)
            wrapped = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        _replace(model, block, wrapped)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in the model (a block in a ModuleList or ModuleDict, or an attribute)."""
    name = next(n for n, m in model.named_modules() if m is old)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
