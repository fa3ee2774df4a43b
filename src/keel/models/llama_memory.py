"""What the Llama keeps for backward, per token, by precision and tensor-parallel degree (for `keel plan`).

Listed from torch's saved-tensor hooks over one forward (tests/test_plan_memory.py checks the sums against them):
with D the width, H the SwiGLU width and t the tensor-parallel degree, a block keeps

  fp32      its input, and in each norm the normalised input and the output: 8 D-wide tensors with q, the attention
            output and the residual sum, and k and v (K-wide on CPU, whose attention kernel reads shared kv heads;
            repeated to all heads, D-wide, on CUDA); 4 H-wide in the MLP
  autocast  the same with the matmul outputs in bf16, the residual stream and the norms in fp32, and the bf16 cast of
            each matmul's input made once per matmul (three for q, k, v; two for the MLP)
  bf16      bf16 throughout, but each norm keeps two fp32 copies of its input (RMSNorm calls x.float() twice)

Under tensor parallel with sequence parallel everything is split t ways except each norm's output gathered over
the whole sequence, which the column-parallel matmuls keep (D per token, whole), and the row-parallel matmuls'
outputs before their reduce-scatter (which only op-level selective checkpointing keeps).

The loss: on one tensor-parallel rank the output projection is fused with the cross-entropy (models/chunked_loss.py),
which keeps the hidden states' gradient (D per token) and the output weight's fp32 gradient (V x D), and in forward
briefly holds a bf16 copy of the weight (autocast), one chunk's logits and a V x D product. Under tensor parallel the
logits are split over the vocabulary and torch's loss_parallel holds the logits (compute dtype), their fp32 copy and
two fp32 tensors as wide at the end of forward, four fp32 tensors as wide in its fused backward.
"""

from __future__ import annotations

from keel.models.chunked_loss import CHUNK_TOKENS
from keel.models.spec import MemoryShape

COMPUTE_BYTES = {"fp32": 4, "autocast": 2, "bf16": 2}  # the dtype matmuls run in
RESIDUAL_BYTES = {"fp32": 4, "autocast": 4, "bf16": 2}  # the residual stream and the final norm's output


def llama_memory(args: object, tp: int, precision: str, device: str, tokens: int) -> MemoryShape:
    """The Llama's MemoryShape (args: LlamaArgs) on a tensor-parallel degree `tp` in `precision` on `device` (its
    type: cpu or cuda), for micro-batches of `tokens` tokens. The rotary tables' complex copies (8 x head_dim bytes
    per position and block) are left out."""
    D, H, K, V, t = args.dim, args.hidden, args.kv_heads * args.head_dim, args.vocab_size, tp
    W = K if device == "cpu" else D  # the width attention keeps k and v at
    c, r = COMPUTE_BYTES[precision], RESIDUAL_BYTES[precision]
    upcast = 4 if c != 4 else 0  # an fp32 copy of what a bf16 matmul made
    # Bytes per token of one block without checkpointing: (split t ways, whole), as the module docstring lists them.
    split, whole = {
        "fp32": (24 * D + 8 * W + 16 * H, 8 * D),
        "autocast": (20 * D + 4 * W + 8 * H, 10 * D),
        "bf16": (24 * D + 4 * W + 8 * H, 4 * D),
    }[precision]
    norm = {"fp32": 8 * D, "autocast": 8 * D, "bf16": 10 * D}[precision] + 4  # and its reciprocal RMS
    stats = 4 * args.n_heads / t + 8  # attention's log-sum-exp per head, and each norm's reciprocal RMS (fp32)
    matmul_params = 2 * D * D + 2 * D * K + 3 * D * H
    output = V * D
    casts = precision == "autocast"
    if t == 1:  # the fused, chunked loss: no logits beyond a chunk's
        weight_copy = 2 * output if casts else 0
        rows = min(tokens, CHUNK_TOKENS)
        previous = 4 + (c if upcast else 0) if tokens > rows else 0  # the last chunk's log-softmax and gradient
        # A chunk's logits, then (bf16 ones freed once copied) their fp32 copy, and its log-softmax.
        making = (previous + (upcast if upcast else c) + 4) * rows * V
        summing = (4 + (c if upcast else 0)) * rows * V + c * output  # its gradient, multiplied into the weight's
        head, loss = norm, (r * D, 2 * r * D, weight_copy + 4 * output + max(making, summing), 8 * output)
    else:  # the gathered norm output kept by the output projection, and loss_parallel over vocabulary shards
        gathered = {"fp32": 4 * D, "autocast": 2 * D, "bf16": 2 * D}[precision]
        head = norm / t + gathered
        loss = ((c + upcast + 8) * V / t, 16 * V / t, 0.0, 0.0)
    return MemoryShape(
        n_blocks=args.n_layers,
        block_params=matmul_params + 2 * D,
        outer_params=output * (1 if args.tie_embeddings else 2) + D,
        block=split / t + whole + stats,
        block_input=r * D / t,
        # wq, wk, wv and w1, w3 are split by column; wo and w2 give whole-width partial sums before reduce-scatter.
        matmuls=tuple(c * w for w in (D / t, K / t, K / t, D, H / t, H / t, D)),
        attention=c * D / t + 4 * args.n_heads / t,
        head=head,
        loss_forward=loss[0],
        loss_backward=loss[1],
        loss_forward_fixed=loss[2],
        loss_backward_fixed=loss[3],
        block_weight_casts=2 * matmul_params / t if casts else 0.0,
        head_weight_casts=2 * output / t if casts and t > 1 else 0.0,
    )
