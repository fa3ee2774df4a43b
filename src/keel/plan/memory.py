"""Per-rank memory of a training step, from the model's shapes and the layout: a breakdown at the step's peak.

A step's memory peaks at one of four moments, and the plan takes the largest:

  loss         the loss's forward: every kept activation, and what the loss holds (the model says what: logits and
               their fp32 copies, or a fused loss's weight-sized gradient and one chunk)
  loss grad    start of backward: the kept activations and the loss's gradients
  block        backward through the last block: its recomputed activations (under checkpointing) and gradients
  optimizer    the update: gradients complete, and AdamW's moments (fused AdamW: no temporaries)

Parameters, gradients and AdamW's two moments are fp32, sharded over dp_shard x tp and split over pipeline stages,
replicated over dp_replicate. FSDP2 gathers each block's parameters (this one and the next, prefetched), keeps the
root's (embedding, output) gathered for the whole step, and under gradient accumulation keeps gradients unsharded;
DDP keeps a copy of the gradients in its buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from keel.distributed.mesh import Layout
from keel.models.spec import MemoryShape

GRAD_SLACK = 3  # a block's backward holds about three gradients as wide as its widest saved tensor (the MLP's)


@dataclass(frozen=True)
class Setup:
    """What a step's memory and time depend on, besides the model: the layout and the batch, resolved."""

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    micro_batch: int  # sequences in one forward on a rank
    accumulation: int  # forwards per optimizer step on a rank (gradient accumulation or pipeline micro-batches)
    seq_len: int
    checkpointing: str  # none, selective, full
    ac_every: int  # selective: every N-th block; 0: per op
    precision: str  # fp32, autocast (bf16 over fp32 weights), bf16 (bf16 weights: FSDP2 mixed precision)
    pp_in_flight: float = 1.0  # micro-batches whose activations the first pipeline stage holds at once

    @property
    def tokens(self) -> int:
        """Tokens in one forward on a rank."""
        return self.micro_batch * self.seq_len

    @property
    def world(self) -> int:
        """Processes in the layout."""
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def layout(self) -> Layout:
        """The mesh sizes, as parallelize reads them."""
        return Layout(dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp, pp=self.pp)

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 wraps the model (any data parallelism but DDP alone; a pipeline's stages always)."""
        return self.layout.fsdp

    @property
    def ddp(self) -> bool:
        """Whether DDP replicates the model (data parallelism over replicas only, no tensor or pipeline parallel)."""
        return self.layout.dp > 1 and not self.layout.fsdp


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds at the step's peak, by what holds them."""

    parameters: float  # fp32 parameters (this rank's shard)
    gradients: float  # fp32 gradients held at the peak
    optimizer: float  # AdamW's two moments
    activations: float  # what forward kept for backward, on every block and the head
    transient: float  # the peak's temporaries: logits and their gradients, a recomputed block, autocast's casts
    buffers: float  # FSDP's gathered parameters, DDP's buckets
    framework: float  # the process before the model: libraries, CUDA context (measured on CPU)
    allocator: float  # freed memory the allocator keeps (glibc's heap on CPU)
    peak_at: str  # which moment: loss, loss grad, block, optimizer

    @property
    def tensors(self) -> float:
        """Bytes in tensors alone (what torch's allocator hands out)."""
        return self.parameters + self.gradients + self.optimizer + self.activations + self.transient + self.buffers

    @property
    def total(self) -> float:
        """Bytes the rank needs: tensors, the framework and the allocator's slack."""
        return self.tensors + self.framework + self.allocator

    def breakdown(self) -> dict[str, float]:
        """Each part in bytes, in declaration order (the peak's moment left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "peak_at"}


def kept_per_block(shape: MemoryShape, setup: Setup, index: int) -> float:
    """Bytes per token block `index` keeps for backward under the checkpointing mode."""
    mode, every = setup.checkpointing, setup.ac_every
    if mode == "full" or (mode == "selective" and every and (index + 1) % every == 0):
        return shape.block_input
    if mode == "selective" and not every:  # Keel keeps every matmul's and attention's output, and the input
        return shape.block_input + sum(shape.matmuls) + shape.attention
    return shape.block


def first_stage_blocks(n_blocks: int, pp: int) -> int:
    """Blocks on the first (largest) pipeline stage: the extra blocks of an uneven split go first."""
    return math.ceil(n_blocks / pp)


def estimate(shape: MemoryShape, setup: Setup, framework: float, allocator: tuple[float, float] = (0.0, 0.0)) -> Memory:
    """The per-rank memory of one training step at its peak, on the rank that holds most.

    `framework` is what the process holds before its model; beyond the tensors the allocator keeps `allocator`'s
    bytes and share of the tensors' bytes (glibc's heap on CPU).
    """
    t, pp, tokens = setup.tp, setup.pp, setup.tokens
    blocks = first_stage_blocks(shape.n_blocks, pp)
    last_stage = pp == 1  # a pipeline's fullest rank is its first stage: the head and the loss are on the last
    outer = shape.outer_params if last_stage else shape.outer_params / 2  # the first stage has the embedding
    local = (blocks * shape.block_params + outer) / t  # this tensor-parallel rank's parameters, unsharded
    shard = local / setup.dp_shard if setup.fsdp else local
    params, optimizer = 4 * shard, 8 * shard

    per_block = [kept_per_block(shape, setup, i) for i in range(blocks)]
    kept = sum(per_block) * tokens * setup.pp_in_flight
    head = shape.head * tokens if last_stage else 0.0
    loss_forward = shape.loss_forward * tokens + shape.loss_forward_fixed if last_stage else 0.0
    loss_backward = shape.loss_backward * tokens + shape.loss_backward_fixed if last_stage else 0.0
    head_casts = shape.head_weight_casts if last_stage else 0.0
    # autocast keeps each weight's bf16 copy until forward ends; backward keeps those of blocks not checkpointed.
    all_casts = shape.block_weight_casts * blocks + head_casts
    kept_casts = shape.block_weight_casts * per_block.count(shape.block) + head_casts

    # Gradients while forward and backward run: none after zero_grad(set_to_none), unless micro-batches accumulate
    # them (FSDP2 then keeps them unsharded until the last micro-batch reduce-scatters them).
    accumulated = 4 * (local if setup.fsdp else shard) if setup.accumulation > 1 else 0.0
    gathered = 0.0
    if setup.fsdp:  # the root's parameters stay gathered all step; one block computes while the next is gathered
        # A pipeline stage stays gathered from its first micro-batch's forward on (it runs many per step).
        in_use = blocks * shape.block_params if pp > 1 else 2 * shape.block_params
        gathered = (2 if setup.precision == "bf16" else 4) * (outer + in_use) / t
    buckets = 4 * shard if setup.ddp else 0.0  # DDP's buckets: a second copy of the gradients
    output_grad = 4 * outer / t if last_stage and not accumulated else 0.0  # from backward's start
    recompute = (shape.block - per_block[-1]) * tokens
    widest = max(shape.matmuls) * tokens
    moments = [
        (kept + head, loss_forward + all_casts, accumulated, "loss"),
        (kept + head, loss_backward + kept_casts, accumulated, "loss grad"),
        (kept, recompute + GRAD_SLACK * widest + kept_casts, accumulated + output_grad, "block"),
    ]
    candidates = [
        Memory(params, grads, optimizer, acts, temps, gathered + buckets, framework, 0.0, name)
        for acts, temps, grads, name in moments
    ]
    # The update: gradients complete; fused AdamW (Keel's, on CPU and CUDA) makes no temporary copies.
    candidates.append(Memory(params, 4 * shard, optimizer, 0.0, 0.0, buckets, framework, 0.0, "optimizer"))
    peak = max(candidates, key=lambda m: m.tensors)
    return replace(peak, allocator=allocator[0] + allocator[1] * peak.tensors)
