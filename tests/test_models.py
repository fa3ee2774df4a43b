"""The model registry and the Llama decoder: closed-form counts, FLOPs, causality, GQA, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import keel
from keel.config_toml import load_config
from keel.data.loader import document_ids, position_ids
from keel.errors import ConfigError
from keel.models import MODELS, get_model_spec, model_args

PRESETS = Path(keel.__file__).parent / "configs"  # the presets `keel` ships


def preset_args(name: str, vocab: int | None = None):
    """The spec and [model] arguments of a shipped preset, with `vocab` for presets that take it from data."""
    section = load_config(PRESETS / name).model_section()
    if vocab is not None:
        section["vocab_size"] = vocab
    return model_args(section)


def llama_params(V, d, L, h, kv, f, tied):
    """The parameter count written out independently: embeddings, per-block attention/MLP/norms, final norm."""
    hd = d // h
    per_block = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f + 2 * d
    return V * d + L * per_block + d + (0 if tied else V * d)


@pytest.mark.parametrize(
    ("preset", "vocab", "shape", "approx", "tolerance"),
    [
        # demo: the default SwiGLU width, int(8 * 256 / 3) = 682 rounded up to a multiple of 256 = 768.
        ("demo.toml", 8192, (8192, 256, 4, 4, 2, 768, False), None, None),
        ("gpt2-124m.toml", None, (50257, 768, 12, 12, 12, 2048, True), 124e6, 2e6),
        ("llama-1b.toml", None, (128256, 2048, 16, 32, 8, 8192, True), 1.24e9, 0.01e9),
    ],
)
def test_parameter_count_matches_closed_form_and_the_built_model(preset, vocab, shape, approx, tolerance):
    spec, args = preset_args(preset, vocab)
    with torch.device("meta"):
        model = spec.build(args)
    built = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert spec.num_params(args) == built == llama_params(*shape)
    if approx:
        assert built == pytest.approx(approx, abs=tolerance)


def test_flops_per_token_matches_measured_flops_of_forward_and_backward():
    spec, args = model_args({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96})
    model, seq_len, batch = spec.build(args), 32, 2
    tokens = torch.randint(0, 96, (batch, seq_len))
    # The math SDPA backend runs attention as plain matmuls over the full (unmasked) score matrix, which
    # the counter sees: the same convention as flops_per_token. The fused CPU kernel is invisible to it.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() / (batch * seq_len) == pytest.approx(spec.flops_per_token(args, seq_len), rel=1e-6)


def test_gpt2_preset_flops_per_token_follows_six_n_plus_attention():
    spec, args = preset_args("gpt2-124m.toml")
    non_embedding = spec.num_params(args) - 50257 * 768 - (2 * 12 + 1) * 768
    assert spec.flops_per_token(args, 1024) == 6 * (non_embedding + 50257 * 768) + 12 * 12 * 768 * 1024


def test_model_is_causal_and_shapes_logits_by_vocabulary():
    spec, args = model_args({"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1, "vocab_size": 50})
    model = spec.build(args)
    tokens = torch.randint(0, 50, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 50)
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 50
    after = model(changed)
    torch.testing.assert_close(after[:, :8], logits[:, :8])
    assert not torch.allclose(after[:, 8:], logits[:, 8:])


def test_grouped_query_attention_equals_full_attention_with_repeated_kv_weights():
    base = {"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 40}
    spec, gqa_args = model_args({**base, "n_kv_heads": 2})
    _, mha_args = model_args(base)
    gqa, mha = spec.build(gqa_args), spec.build(mha_args)
    state = gqa.state_dict()
    for name in ("wk", "wv"):
        w = state[f"layers.0.attention.{name}.weight"].view(2, 8, 32)
        state[f"layers.0.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 40, (1, 10))
    torch.testing.assert_close(mha(tokens), gqa(tokens))


def test_same_seed_builds_identical_weights_and_tied_embeddings_share_storage():
    spec, args = model_args({"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 30, "tie_embeddings": True})
    torch.manual_seed(3)
    a = spec.build(args)
    torch.manual_seed(3)
    b = spec.build(args)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.output.weight is a.tok_embeddings.weight
    assert not any("rope" in k for k in a.state_dict())


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "gpt5"}, "model.name: unknown model 'gpt5'; known: llama"),
        ({"dims": 3}, "model.dims: unknown key (see `keel train --help-config` for the keys)"),
        ({"n_layers": -1}, "model.n_layers: Input should be greater than 0 (got -1)"),
        ({"dim": 66, "n_heads": 4}, "model.dim: 66 must be a multiple of model.n_heads (4)"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_heads: 4 must be a multiple of model.n_kv_heads (3)"),
    ],
)
def test_bad_model_arguments_name_the_key(section, message):
    with pytest.raises(ConfigError) as err:
        model_args(section)
    assert str(err.value) == message


def test_model_built_on_meta_and_materialised_equals_a_direct_build():
    section = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 30, "tie_embeddings": True}
    spec, args = model_args(section)
    torch.manual_seed(5)
    direct = spec.build(args)
    with torch.device("meta"):
        lazy = spec.build(args)
    lazy.to_empty(device="cpu")
    torch.manual_seed(5)
    lazy.init_weights(5)
    assert lazy.output.weight is lazy.tok_embeddings.weight  # to_empty() untied them; init_weights re-ties
    for (name, p), q in zip(direct.state_dict().items(), lazy.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    # The rotary tables are buffers outside the state dict; init_weights must have recomputed them too.
    torch.testing.assert_close(lazy.rope_cos, direct.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(lazy.rope_sin, direct.rope_sin, rtol=0, atol=0)
    tokens = torch.randint(0, 30, (1, 6))
    torch.testing.assert_close(lazy(tokens), direct(tokens))


def test_shard_units_are_the_transformer_blocks():
    spec, args = model_args({"dim": 32, "n_layers": 3, "n_heads": 2, "vocab_size": 30})
    model = spec.build(args)
    assert spec.shard_units(model) == list(model.layers.values()) and len(model.layers) == 3


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    spec, args = model_args({"dim": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 30, "max_seq_len": 8})
    with pytest.raises(ConfigError, match="model.max_seq_len: 8 is shorter than a 9-token sequence"):
        spec.build(args)(torch.zeros(1, 9, dtype=torch.long))


def test_building_with_no_vocabulary_is_a_clear_error():
    spec, args = model_args({})
    with pytest.raises(ConfigError, match="model.vocab_size is 0"):
        spec.build(args)


def test_every_registered_model_documents_its_keys():
    for name, spec in MODELS.items():
        assert get_model_spec(name) is spec
        assert all(f.description for f in spec.args_cls.model_fields.values())


def _packed_model_and_documents():
    """A tiny model and one packed row [doc A, EOS, doc B] (EOS = 0), with its document ids and positions."""
    # Large initial weights make attention peaked, so positions and masking change the logits clearly.
    base = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 50, "init_std": 0.3}
    spec, args = model_args(base)
    torch.manual_seed(0)
    model = spec.build(args)
    doc_a, doc_b = torch.randint(1, 50, (5,)), torch.randint(1, 50, (7,))
    packed = torch.cat([doc_a, torch.tensor([0]), doc_b])[None]
    documents = document_ids(packed, eos_id=0)
    return model, packed, doc_b[None], documents, position_ids(documents)


def test_packed_document_with_mask_and_positions_equals_the_document_alone():
    model, packed, doc_b, documents, positions = _packed_model_and_documents()
    assert positions[0, 6:].tolist() == list(range(7)) and documents[0].tolist() == [0] * 6 + [1] * 7
    alone = model(doc_b)
    masked = model(packed, positions=positions, documents=documents)
    torch.testing.assert_close(masked[:, 6:], alone)  # fp32 tolerances: atol 1e-5, rtol 1.3e-6
    torch.testing.assert_close(masked[:, :6], model(packed[:, :6]))
    # RoPE scores depend on relative positions only, so the mask alone isolates doc B too (up to rounding).
    torch.testing.assert_close(model(packed, documents=documents)[:, 6:], alone)
    # Without the mask doc B attends to doc A: the test can tell the difference.
    assert not torch.allclose(model(packed, positions=positions)[:, 6:], alone, atol=1e-2)


def test_positions_are_used_and_default_to_arange_exactly():
    model, packed, _, documents, positions = _packed_model_and_documents()
    default = model(packed)
    assert torch.equal(model(packed, positions=torch.arange(packed.shape[1])[None]), default)
    assert not torch.allclose(model(packed, positions=positions), default, atol=1e-2)
    # One document is plain causal attention (through the masked kernel, so equal up to rounding).
    torch.testing.assert_close(model(packed, documents=torch.zeros_like(packed)), default)
