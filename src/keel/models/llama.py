"""A Llama-3-style decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.distributed.tensor import DTensor

from keel.errors import ConfigError
from keel.models.chunked_loss import linear_cross_entropy
from keel.models.llama_hf import HF
from keel.models.llama_memory import llama_memory
from keel.models.llama_parallel import tensor_parallel
from keel.models.loss import next_token_loss
from keel.models.spec import ModelSpec, PipelineSplit, fill_shard


class LlamaArgs(BaseModel):
    """The [model] keys of a Llama-style decoder."""

    model_config = ConfigDict(extra="forbid")
    dim: int = Field(256, gt=0, description="Width of the residual stream.")
    n_layers: int = Field(4, gt=0, description="Number of transformer blocks.")
    n_heads: int = Field(4, gt=0, description="Query heads per attention layer.")
    n_kv_heads: int | None = Field(None, gt=0, description="Key/value heads (grouped-query); empty = n_heads.")
    vocab_size: int = Field(0, ge=0, description="Vocabulary size; 0 takes it from the dataset's tokenizer.")
    ffn_hidden: int | None = Field(None, gt=0, description="SwiGLU hidden width; empty = 8/3 dim, rounded up.")
    multiple_of: int = Field(256, gt=0, description="Round the default SwiGLU width up to a multiple of this.")
    norm_eps: float = Field(1e-5, gt=0, description="Epsilon of RMSNorm.")
    rope_theta: float = Field(10000.0, gt=0, description="Base of the rotary position embedding frequencies.")
    max_seq_len: int = Field(2048, gt=0, description="Longest sequence the rotary tables cover.")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output projection.")
    init_std: float = Field(0.02, gt=0, description="Standard deviation of the initial weights.")

    @model_validator(mode="after")
    def _check_heads(self) -> LlamaArgs:
        if self.dim % self.n_heads:
            raise ValueError(f"dim: {self.dim} must be a multiple of model.n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim: the head size dim / n_heads = {self.dim // self.n_heads} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads: {self.n_heads} must be a multiple of model.n_kv_heads ({self.kv_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)


class RMSNorm(nn.Module):
    """Scale by the reciprocal root-mean-square of the features (no mean, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16's short mantissa makes the mean of squares noisy.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, shape [max_seq_len, head_dim / 2]."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) feature pair of x [B, T, H, D] by its angle in cos, sin [B or 1, T, 1, D / 2]."""
    # As one complex product (even + i odd) * (cos + i sin): a single kernel each way, where the real arithmetic
    # (four products, a stack) took a dozen; the same values bit for bit.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, T] from document ids [B, T]: causal, and only within the same document."""
    # A dense mask rules out the flash SDPA kernel on CUDA (memory-efficient or math attention run instead, with
    # B*T*T mask bytes in memory); flex_attention with a block mask, or varlen flash attention, is the fast path.
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: n_heads queries share n_kv_heads keys and values."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        # Shape by head_dim, not head count, so a tensor-parallel shard (fewer local heads) works unchanged.
        q = apply_rope(self.wq(x).view(B, T, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = k.shape[1] != q.shape[1]
        if gqa and x.device.type != "cpu":
            # Repeat kv heads rather than pass enable_gqa: on CUDA only the flash and math kernels honour that flag
            # (pytorch#139586), so fp32 or cuDNN runs would fall back to math; equal heads suit every kernel. The
            # CPU flash kernel reads shared heads itself (the same values, without the copies and their backward).
            repeats = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            gqa = False
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token embedding, a stack of blocks, a final norm and the output projection to logits.

    The blocks are keyed by their index, so a pipeline stage (the model with the other blocks deleted, the
    embedding only on the first stage, the norm and output only on the last) keeps every parameter's name.
    """

    def __init__(self, args: LlamaArgs):
        super().__init__()
        if args.vocab_size == 0:
            raise ConfigError("model.vocab_size is 0; set it, or let `keel train` take it from the dataset")
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Non-persistent: recomputed, never checkpointed, so state dicts hold parameters only.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter and the rotary tables, after building on the meta device and sharding.

        Each parameter is drawn whole from its own generator, seeded by `seed` and its name, and each rank keeps
        its shard of it: the weights are the same however the model is sharded, on one process or many.
        """
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            # to_empty() gives each module its own copy of a shared meta parameter: tie them again.
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        std = self.args.init_std
        # Residual-branch outputs are scaled down so the stream's variance does not grow with depth.
        out_std = std / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "")
            if p.ndim == 1:
                fill_shard(p, torch.ones(p.shape))
            else:
                scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
                fill_shard(p, torch.empty(p.shape).normal_(0.0, scale, generator=generator))

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T], or with targets [B, T] the mean next-token loss (fp32).

        positions and documents are the position ids and document ids [B, T] of packed data, when present. A
        pipeline stage without the embedding takes hidden states [B, T, dim] instead of token ids, and one without
        the output returns them (and ignores the targets).
        """
        T = tokens.shape[1]
        if T > self.args.max_seq_len:
            raise ConfigError(f"model.max_seq_len: {self.args.max_seq_len} is shorter than a {T}-token sequence")
        if positions is None:
            cos, sin = self.rope_cos[None, :T, None], self.rope_sin[None, :T, None]
        else:
            # Each token's own row of the tables: positions restart at every document of a packed sequence.
            cos, sin = self.rope_cos[positions][:, :, None], self.rope_sin[positions][:, :, None]
        mask = None if documents is None else document_mask(documents)
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask)
        if self.output is None:
            return h
        h = self.norm(h)
        if targets is None:
            return self.output(h)
        if isinstance(self.output.weight, DTensor):
            # Tensor parallel: logits split over the vocabulary, the loss on those shards (loss parallel).
            return next_token_loss(self.output(h), targets)
        return linear_cross_entropy(h, self.output.weight, targets)


def num_params(args: LlamaArgs) -> int:
    """Closed-form parameter count."""
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.kv_heads * hd * 2
    block = attention + 3 * d * args.hidden + 2 * d
    embeddings = args.vocab_size * d * (1 if args.tie_embeddings else 2)
    return embeddings + args.n_layers * block + d


def flops_per_token(args: LlamaArgs, seq_len: int) -> float:
    """Training FLOPs per token, forward and backward (the PaLM / torchtitan convention).

    6 per matmul weight (2 forward, 4 backward): every parameter but the norms and the embedding
    lookup, with the output projection counted even when tied; plus attention's two
    sequence-length matmuls, 12 * layers * dim * seq_len, not halved for the causal mask.
    torch's FlopCounterMode measures the same on the math and CUDA fused SDPA kernels; it does not see
    the fused CPU kernel, so on CPU it reports only the 6N part.
    """
    matmul_params = num_params(args) - args.vocab_size * args.dim
    if args.tie_embeddings:
        matmul_params += args.vocab_size * args.dim
    norm_params = (2 * args.n_layers + 1) * args.dim
    return 6 * (matmul_params - norm_params) + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def build(args: LlamaArgs) -> Llama:
    """A Llama on the current default device, its weights initialised from torch's seed (on meta: not initialised)."""
    device = torch.get_default_device()
    # Construct on meta (no memory, and no RNG draws by nn.Linear's own init), then allocate and initialise once,
    # as training does after sharding: the weights depend only on the seed.
    with torch.device("meta"):
        model = Llama(args)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights(torch.initial_seed())
    return model


SPEC = ModelSpec(
    name="llama",
    args_cls=LlamaArgs,
    build=build,
    num_params=num_params,
    flops_per_token=flops_per_token,
    shard_units=lambda model: list(model.layers.values()),
    init_weights=lambda model, seed: model.init_weights(seed),
    tensor_parallel=tensor_parallel,
    hf=HF,
    pipeline=PipelineSplit("layers", first=("tok_embeddings",), last=("norm", "output")),
    high_precision=("output",),
    memory=llama_memory,
)
