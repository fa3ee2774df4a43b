"""What the Llama keeps for backward, per token, by precision and tensor-parallel degree (for `keel plan`).

Listed from torch's saved-tensor hooks over one forward (tests/test_plan_memory.py checks the sums against them):
with D the width, H the SwiGLU width and t the tensor-parallel degree, a block keeps

  fp32      its input, and in each norm the normalised input and the output: 10 D-wide tensors with q, k and v
            (k and v repeated to all heads), the attention output and the residual sum; 4 H-wide in the MLP
  autocast  the same with the matmul outputs in bf16, the residual stream and the norms in fp32, and the bf16 cast of
            each matmul's input made once per matmul (three for q, k, v; two for the MLP)
  bf16      bf16 throughout, but each norm keeps two fp32 copies of its input (RMSNorm calls x.float() twice)

Under tensor parallel with sequence parallel everything is split t ways except each norm's output gathered over
the whole sequence, which the column-parallel matmuls keep (D per token, whole), and the row-parallel matmuls'
outputs before their reduce-scatter (which only op-level selective checkpointing keeps).
"""

from __future__ import annotations

from keel.models.spec import MemoryShape

COMPUTE_BYTES = {"fp32": 4, "autocast": 2, "bf16": 2}  # the dtype matmuls run in
RESIDUAL_BYTES = {"fp32": 4, "autocast": 4, "bf16": 2}  # the dtype of the residual stream between blocks


def llama_memory(args: object, tp: int, precision: str) -> MemoryShape:
    """The Llama's MemoryShape (args: LlamaArgs) on a tensor-parallel degree `tp` in `precision`."""
    D, H, K, t = args.dim, args.hidden, args.kv_heads * args.head_dim, tp
    c = COMPUTE_BYTES[precision]
    # Bytes per token of one block (and of the head) without checkpointing, as the module docstring lists them.
    split, whole = {
        "fp32": (32 * D + 16 * H, 8 * D),
        "autocast": (24 * D + 8 * H, 10 * D),
        "bf16": (28 * D + 8 * H, 4 * D),
    }[precision]
    head_split, head_whole = {"fp32": (8 * D, 4 * D), "autocast": (8 * D, 2 * D), "bf16": (10 * D, 2 * D)}[precision]
    stats = 4 * args.n_heads / t + 8  # attention's log-sum-exp per head, and each norm's reciprocal RMS (fp32)
    matmul_params = 2 * D * D + 2 * D * K + 3 * D * H
    block_params = matmul_params + 2 * D
    output = args.vocab_size * D
    casts = precision == "autocast"
    return MemoryShape(
        n_blocks=args.n_layers,
        block_params=block_params,
        outer_params=output * (1 if args.tie_embeddings else 2) + D,
        block=split / t + whole + stats,
        block_input=RESIDUAL_BYTES[precision] * D / t,
        # wq, wk, wv and w1, w3 are split by column; wo and w2 give whole-width partial sums before reduce-scatter.
        matmuls=tuple(c * w for w in (D / t, K / t, K / t, D, H / t, H / t, D)),
        attention=c * D / t + 4 * args.n_heads / t,
        head=(head_split + 4) / t + head_whole,  # with the final norm's reciprocal RMS
        vocab=args.vocab_size // t,
        block_weight_casts=2 * matmul_params / t if casts else 0.0,
        head_weight_casts=2 * output / t if casts else 0.0,
    )
