"""The Llama's tensor-parallel plan (Megatron-style, with sequence parallel and loss parallel), applied from outside.

Between blocks the residual stream is split along the sequence (Shard(1)); norms run on their sequence shard; each
block gathers the sequence before attention and the MLP, whose input projections split heads and hidden units by
column and whose output projections reduce-scatter back to sequence shards. The output projection keeps the
logits split along the vocabulary, so the loss runs on vocabulary shards (torch's loss_parallel).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shard the Llama's weights over the tensor-parallel mesh in place (on the meta device, before FSDP)."""
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    # A pipeline stage lacks some of these; between stages the residual stream travels as its sequence shard.
    parallelize_module(model, mesh, {name: style for name, style in plan.items() if getattr(model, name) is not None})
    for block in model.layers.values():
        parallelize_module(
            block,
            mesh,
            {
                "attention_norm": SequenceParallel(),
                # (x, cos, sin, mask): only x is split; the rotary tables and the mask stay whole on every rank.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            },
        )
