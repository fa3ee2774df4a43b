"""The Llama's Hugging Face counterpart (LlamaForCausalLM): parameter names, RoPE row order, config.json keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from keel.models.spec import HFMapping, StateDict

if TYPE_CHECKING:
    from keel.models.llama import LlamaArgs

# Keel parameter names -> Hugging Face LlamaForCausalLM's; per-block names are under layers.{i}. / model.layers.{i}.
_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}


def _hf_names(args: LlamaArgs) -> dict[str, str]:
    names = {k: v for k, v in _HF_NAMES.items() if not (args.tie_embeddings and k == "output.weight")}
    for i in range(args.n_layers):
        names.update({f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _HF_BLOCK_NAMES.items()})
    return names


def _rope_rows(w: torch.Tensor, args: LlamaArgs, to_hf: bool) -> torch.Tensor:
    """Reorder each head's rows between Keel's RoPE pairs (2i, 2i+1) and HF's rotate_half pairs (i, i + d/2)."""
    # Row r of a Keel head is feature (r // 2, r % 2) of pair-major order; HF's is half-major: swap the two axes.
    shape = (-1, args.head_dim // 2, 2) if to_hf else (-1, 2, args.head_dim // 2)
    return w.unflatten(0, shape).transpose(1, 2).flatten(0, 2).contiguous()


def _convert(args: LlamaArgs, state: StateDict, to_hf: bool) -> StateDict:
    names = _hf_names(args)
    if not to_hf:
        names = {hf: keel for keel, hf in names.items()}
    out = {}
    for src, dst in names.items():
        keel_name = src if to_hf else dst
        rotated = keel_name.endswith(("attention.wq.weight", "attention.wk.weight"))
        out[dst] = _rope_rows(state[src], args, to_hf) if rotated else state[src].contiguous()
    if args.tie_embeddings and not to_hf:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config(args: LlamaArgs) -> dict[str, Any]:
    """config.json keys of the equivalent LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        # transformers 5 reads rope_parameters; 4.x and other tools read the top-level rope_theta.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
    }


def hf_unsupported(config: dict[str, Any]) -> str | None:
    """What in an HF Llama config.json this model does not implement, so its weights would compute other logits."""
    # transformers 5 nests RoPE settings in rope_parameters, 4.x in rope_scaling (null when unscaled).
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if kind != "default":
            return f"{key} has rope_type {kind!r} (RoPE scaling); Keel's llama implements only unscaled RoPE"
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            return f"{key} is true; Keel's llama has no bias terms"
    if config.get("hidden_act", "silu") != "silu":
        return f"hidden_act is {config['hidden_act']!r}; Keel's llama uses silu (SwiGLU)"
    return None


HF = HFMapping(
    config=hf_config,
    to_hf=lambda args, state: _convert(args, state, to_hf=True),
    from_hf=lambda args, state: _convert(args, state, to_hf=False),
    checked={
        "model_type": "name",
        "hidden_size": "dim",
        "intermediate_size": "ffn_hidden",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "vocab_size": "vocab_size",
        "rms_norm_eps": "norm_eps",
        "rope_parameters.rope_theta": "rope_theta",
        "tie_word_embeddings": "tie_embeddings",
    },
    unsupported=hf_unsupported,
)
