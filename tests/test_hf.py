"""Hugging Face interoperability: `keel export` loads in transformers with Keel's logits; import is exact."""

from __future__ import annotations

import json
import re
import shutil
import stat
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import TINY_MODEL, assert_one_line_error, read_metrics, run_keel, tiny_config
from keel.checkpoint.commit import write_commit
from keel.checkpoint.hf import export_hf, load_hf_weights
from keel.checkpoint.inference import load_model
from keel.config_toml import build_config, save_config
from keel.errors import CheckpointError, ConfigError, KeelError
from keel.models import model_args


def train(tmp_path, dataset, name, **sections):
    config = tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name, "seed": 0}, **sections)
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "runs" / name


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dataset):
    """A tiny tied-embedding run trained 3 steps with `keel train` (val loss at the end), and its `keel export`."""
    tmp = tmp_path_factory.mktemp("hf")
    run = train(tmp, dataset, "src", model={"tie_embeddings": True}, train={"steps": 3, "eval_every": 3})
    result = run_keel("export", str(run), "--format", "hf", "--out", str(tmp / "hf"), cwd=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    return run, tmp / "hf"


def saved_run(run, dataset, **model):
    """A run dir with a committed checkpoint of a freshly initialised model, made in-process (no training)."""
    step_dir = run / "checkpoints" / "step_1"
    step_dir.mkdir(parents=True)
    raw = {"model": {"name": "llama", **TINY_MODEL, "vocab_size": 512, **model}, "run": {"dir": str(run)}}
    save_config(build_config(raw), run / "config.toml")
    shutil.copyfile(dataset / "tokenizer.json", run / "tokenizer.json")
    spec, args = model_args(raw["model"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the point
        dcp.save({"model": {"model": spec.build(args).state_dict()}}, checkpoint_id=str(step_dir))
    write_commit(step_dir, step=1, world_size=1)
    return run


def max_logit_diff(run, hf_dir):
    """Largest |Keel logit - transformers logit| over a text prompt plus random tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.eos_token == "<|endoftext|>"
    model, _ = load_model(run)
    assert hf_model.config.tie_word_embeddings == model.args.tie_embeddings
    ids = tokenizer("the model reads tokens and predicts the next one", return_tensors="pt").input_ids
    ids = torch.cat([ids, torch.randint(0, model.args.vocab_size, (1, 40))], dim=1)
    with torch.no_grad():
        return (model(ids) - hf_model(ids).logits).abs().max().item()


def test_exported_trained_model_loads_in_transformers_with_keels_logits(exported):
    run, hf_dir = exported
    assert {p.name for p in hf_dir.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert max_logit_diff(run, hf_dir) < 1e-4


def test_untied_model_with_large_weights_matches_transformers_and_round_trips(tmp_path, dataset):
    # Large weights make attention sharp: a wrong RoPE feature order moves these logits by ~2.5, the right one by ~2e-6.
    run = saved_run(tmp_path / "run", dataset, init_std=0.1)
    export_hf(run, tmp_path / "hf")
    assert max_logit_diff(run, tmp_path / "hf") < 1e-4
    assert_round_trip_exact(run, tmp_path / "hf")


def test_keel_to_hf_to_keel_round_trip_is_bit_exact(exported):
    assert_round_trip_exact(*exported)


def assert_round_trip_exact(run, hf_dir):
    """Weights imported from the export equal the checkpoint's, bit for bit."""
    model, cfg = load_model(run)
    spec, args = model_args(cfg.model_section())
    fresh = spec.build(args)
    load_hf_weights(fresh, spec, args, hf_dir)
    expected, loaded = model.state_dict(), fresh.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_train_init_from_hf_starts_from_the_exported_weights(exported, tmp_path, dataset):
    run, hf_dir = exported
    new = train(
        tmp_path,
        dataset,
        "continued",
        model={"tie_embeddings": True},
        train={"steps": 1, "eval_every": 1},
        checkpoint={"init_from_hf": str(hf_dir)},
    )
    # The same weights on the same validation batches: the new run's step-0 loss is the old run's last, exactly.
    before = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    assert [r["val_loss"] for r in read_metrics(new) if r["step"] == 0] == [before]


def test_init_from_hf_with_another_shape_is_a_one_line_error_naming_the_key(exported, tmp_path, dataset):
    run, hf_dir = exported
    config = tiny_config(
        tmp_path / "bad.toml",
        dataset,
        model={"tie_embeddings": True, "n_layers": 3},
        checkpoint={"init_from_hf": str(hf_dir)},
    )
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"keel: error: model.n_layers: {hf_dir}/config.json has num_hidden_layers = 2, the config gives 3; "
        "set model.n_layers to match (or point checkpoint.init_from_hf elsewhere)"
    ]


def test_bad_hf_directories_are_refused_with_errors_naming_the_file(exported, tmp_path):
    run, hf_dir = exported
    model, cfg = load_model(run)
    spec, args = model_args(cfg.model_section())
    with pytest.raises(ConfigError, match="has no config.json"):
        load_hf_weights(model, spec, args, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="has no hidden_size"):
        load_hf_weights(model, spec, args, tmp_path)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files; export or save"):
        load_hf_weights(model, spec, args, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_hf_weights(model, spec, args, tmp_path)


def hf_copy_with_config(hf_dir, out, change, drop=None):
    """A copy of an exported HF directory whose config.json has `change` applied (and key `drop` removed)."""
    shutil.copytree(hf_dir, out)
    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    config.pop(drop, None)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}},
            "rope_parameters has rope_type 'llama3' (RoPE scaling)",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling has rope_type 'linear' (RoPE scaling)"),
        ({"attention_bias": True}, "attention_bias is true; Keel's llama has no bias terms"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'; Keel's llama uses silu"),
    ],
)
def test_hf_configs_with_features_the_model_lacks_are_refused_before_any_weight_loads(
    exported, tmp_path, change, reason
):
    run, hf_dir = exported
    model, cfg = load_model(run)
    spec, args = model_args(cfg.model_section())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited = hf_copy_with_config(hf_dir, tmp_path / "hf", change)
    with pytest.raises(ConfigError, match=re.escape(reason)) as error:
        load_hf_weights(model, spec, args, edited)
    assert "\n" not in str(error.value) and "import a model without it" in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hf_configs_from_transformers_4_without_rope_scaling_are_accepted(exported, tmp_path):
    run, hf_dir = exported
    model, cfg = load_model(run)
    spec, args = model_args(cfg.model_section())
    edited = hf_copy_with_config(hf_dir, tmp_path / "hf", {"rope_scaling": None}, drop="rope_parameters")
    load_hf_weights(model, spec, args, edited)


def test_export_mistakes_are_one_line_errors(exported, tmp_path):
    run, hf_dir = exported
    result = run_keel("export", str(run), "--format", "onnx", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "keel: error: --format 'onnx': unknown export format; use --format hf\n"
    with pytest.raises(KeelError, match="not a Keel run dir"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"no committed checkpoint at step 7; committed steps: \[3\]"):
        export_hf(run, tmp_path / "out", step=7)
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        export_hf(run, hf_dir)
    assert not (tmp_path / "out").exists()


def test_exported_files_are_readable_by_all(exported):
    _, hf_dir = exported
    assert stat.S_IMODE(hf_dir.stat().st_mode) == 0o755
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in hf_dir.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_export_to_a_location_that_cannot_be_written_is_one_line_naming_it(exported, tmp_path, where, request):
    run, _ = exported
    if where == "under-a-file":
        (tmp_path / "file").write_text("")
        out, fragment = tmp_path / "file" / "hf", f"{tmp_path / 'file'} is a file, not a directory"
    else:
        out, fragment = request.getfixturevalue("read_only_dir") / "hf", "read-only file system"
    result = run_keel("export", str(run), "--out", str(out), cwd=tmp_path)
    assert_one_line_error(result, f"--out {out}", fragment)
