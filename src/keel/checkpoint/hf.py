"""Hugging Face interoperability: export a run as safetensors + config.json + tokenizer, and import such weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from keel.checkpoint.inference import checkpoint_path, load_model
from keel.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer
from keel.errors import CheckpointError, ConfigError, KeelError
from keel.io import check_writable_dir, filesystem_errors, first_line
from keel.models import model_args
from keel.models.spec import HFMapping, ModelSpec
from keel.observe.card import model_card
from keel.rundir import RunDir

FORMATS = ("hf",)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"  # where the Hub and huggingface_hub.ModelCard look for a model card
_MISSING = object()


def _mapping(spec: ModelSpec) -> HFMapping:
    if spec.hf is None:
        raise ConfigError(
            f"model.name: model {spec.name!r} has no Hugging Face mapping (ModelSpec.hf) to export or import with"
        )
    return spec.hf


def export_hf(run_dir: Path, out: Path, step: int | None = None, fmt: str = "hf") -> Path:
    """Write the run's checkpoint at `step` (newest when None) to `out` in Hugging Face format; returns the path."""
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: unknown export format; use --format hf")
    run = RunDir(run_dir).require(CheckpointError)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: already exists and is not an empty directory; choose a new directory")
    check_writable_dir(out, "--out", ConfigError)
    path = checkpoint_path(run_dir, step)
    model, cfg = load_model(run_dir, step)
    card = model_card(run_dir, step)  # before anything is written: a card that cannot be made stops the export
    spec, args = model_args(cfg.model_section())
    mapping = _mapping(spec)
    state = mapping.to_hf(args, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    tokenizer = load_tokenizer(run.tokenizer)
    eos = eos_id(tokenizer)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    # transformers 5 reads dtype, 4.x torch_dtype; both name the stored dtype, so either loads without a cast.
    config = {**mapping.config(args), "dtype": dtype, "torch_dtype": dtype, "bos_token_id": eos, "eos_token_id": eos}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    # Write beside the target and rename into place, so a failed export never leaves a half-written model.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with filesystem_errors("write the export"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _save_weights(state, tmp / WEIGHTS_FILE, {"format": "pt", "keel_checkpoint": str(path)})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
            shutil.copyfile(run.tokenizer, tmp / "tokenizer.json")
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
            # Files 0644 and the directory 0755, as a model download's: safetensors creates its file 0600.
            for file in tmp.iterdir():
                file.chmod(0o644)
            tmp.chmod(0o755)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_weights(state: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    try:
        save_file(state, file, metadata=metadata)
    except SafetensorError as e:  # safetensors reports an I/O failure (a full disk) as its own error, not OSError
        raise KeelError(
            f"{file}: cannot write the weights ({first_line(e)}); free space or choose another location"
        ) from None


def _lookup(table: dict[str, Any], key: str) -> Any:
    node: Any = table
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            # Older configs keep what is now nested at the top level (e.g. rope_theta before rope_parameters).
            return table.get(key.rsplit(".", 1)[-1], _MISSING)
        node = node[part]
    return node


def read_hf_config(directory: Path) -> dict[str, Any]:
    """A Hugging Face directory's config.json, with one-line errors for a missing or malformed file."""
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(
            f"checkpoint.init_from_hf: {directory} has no {CONFIG_FILE}; point it at a Hugging Face model directory"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"checkpoint.init_from_hf: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"checkpoint.init_from_hf: {file} is not a JSON object")
    return config


def check_hf_config(config: dict[str, Any], mapping: HFMapping, args: BaseModel, file: Path) -> None:
    """Every shape key of an HF config.json must agree with the [model] section; else name the key to change."""
    reason = mapping.unsupported(config)
    if reason is not None:
        raise ConfigError(f"checkpoint.init_from_hf: {file}: {reason}; import a model without it")
    expected = mapping.config(args)
    for hf_key, keel_key in mapping.checked.items():
        found, want = _lookup(config, hf_key), _lookup(expected, hf_key)
        if found is _MISSING:
            raise ConfigError(
                f"checkpoint.init_from_hf: {file} has no {hf_key}, so it cannot be checked against "
                f"model.{keel_key}; is it a Llama-format config?"
            )
        if found != want:
            raise ConfigError(
                f"model.{keel_key}: {file} has {hf_key} = {found!r}, the config gives {want!r}; "
                f"set model.{keel_key} to match (or point checkpoint.init_from_hf elsewhere)"
            )


def safetensors_files(directory: Path) -> list[Path]:
    """A directory's *.safetensors files; pickled *.bin / *.pt weights are refused, never loaded."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f"it holds only pickled weights ({', '.join(pickles)}), which Keel refuses because unpickling can "
            "run code; convert them to safetensors"
            if pickles
            else "export or save the model as safetensors"
        )
        raise CheckpointError(f"checkpoint.init_from_hf: {directory} has no *.safetensors files; {hint}")
    return files


def _unreadable(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a directory's *.safetensors files (see safetensors_files)."""
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(file, e) from None
    return state


def check_hf_dir(directory: Path, spec: ModelSpec, args: BaseModel) -> None:
    """What load_hf_weights would refuse, found without loading a tensor: config.json, safetensors headers."""
    directory = Path(directory)
    check_hf_config(read_hf_config(directory), _mapping(spec), args, directory / CONFIG_FILE)
    for file in safetensors_files(directory):
        try:
            with safe_open(file, framework="pt"):  # reads only the header
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(file, e) from None


def load_hf_weights(model: nn.Module, spec: ModelSpec, args: BaseModel, directory: Path) -> None:
    """Load a Hugging Face format directory's weights into a model, exactly; each rank keeps its shards of them."""
    directory = Path(directory)
    mapping = _mapping(spec)
    check_hf_dir(directory, spec, args)
    hf_state = read_safetensors(directory)
    try:
        state = mapping.from_hf(args, hf_state)
    except KeyError as e:
        raise CheckpointError(f"checkpoint.init_from_hf: {directory} has no tensor {e.args[0]!r}") from None
    own = get_model_state_dict(model)  # full names and whole shapes, however the model is wrapped and sharded
    state = {name: tensor for name, tensor in state.items() if name in own}  # a pipeline stage holds only its part
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(
                f"checkpoint.init_from_hf: {directory} tensor for {name} has shape "
                f"{list(tensor.shape)}, the model's is {list(own[name].shape)}"
            )
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
