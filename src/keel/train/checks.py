"""What a training worker would refuse, checked in the launching process before any file or process is created."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import BaseModel

from keel.checkpoint.commit import committed_steps
from keel.checkpoint.hf import check_hf_dir
from keel.config import Config, split_batch
from keel.data.dataset import TokenDataset
from keel.data.loader import num_samples
from keel.data.manifest import load_manifest, manifest_sha256, resolve_inside
from keel.data.mixture import MixtureOrder
from keel.distributed.float8 import fp8_problem
from keel.distributed.mesh import resolve_layout
from keel.errors import ConfigError, DataError, LaunchError
from keel.eval.templates import load_templates
from keel.io import check_writable_dir, filesystem_errors, sha256_file
from keel.models import model_args
from keel.models.spec import ModelSpec
from keel.observe.prometheus import check_ports
from keel.observe.wandb_sink import check_wandb
from keel.rundir import RunDir


def check_file_hash(path: Path, expected: str, fix: str) -> None:
    """Refuse a file whose SHA-256 is not `expected` (the manifest's): one line naming the file and the fix."""
    with filesystem_errors("read the file", DataError):
        digest = sha256_file(path)
    if digest != expected:
        raise DataError(
            f"{path}: does not match the dataset manifest (sha256 {digest[:12]}, the manifest says {expected[:12]}); "
            f"{fix}"
        )


def check_tokenizer(dataset: Path, manifest: dict) -> None:
    """Refuse a dataset whose tokenizer file is not the one its tokens were made with (the manifest's hash)."""
    path = resolve_inside(dataset, manifest.tokenizer.file)
    check_file_hash(path, manifest.tokenizer.sha256, "restore the tokenizer it was prepared with")


def mixture_hashes(mixture: dict[str, float], recorded: dict[str, str], tokenizer_sha256: str) -> dict[str, str]:
    """Each data.mixture dataset's manifest hash; refuses a missing, malformed or (since `recorded`) changed one,
    and one with another tokenizer than data.dataset (whose tokenizer, vocab and val split the run uses)."""
    hashes = {}
    for directory in mixture:
        if not Path(directory).is_dir():
            raise DataError(
                f"data.mixture: dataset {directory} does not exist; fix the path or make it with `keel data prepare`"
            )
        try:
            manifest = load_manifest(directory)
        except DataError as e:
            raise DataError(f"data.mixture: {e}") from None
        digest = manifest_sha256(directory)
        if recorded.get(directory, digest) != digest:
            raise DataError(
                f"data.mixture: dataset {directory} has changed since this run started (manifest hash {digest[:12]}, "
                f"the run expects {recorded[directory][:12]}); point data.mixture at the original data"
            )
        if manifest.tokenizer.sha256 != tokenizer_sha256:
            raise DataError(
                f"data.mixture: dataset {directory} has another tokenizer than data.dataset; prepare every dataset "
                "of a mixture (and data.dataset, which gives validation) with the same data.tokenizer"
            )
        hashes[directory] = digest
    return hashes


def check_layout(cfg: Config, spec: ModelSpec, args: BaseModel) -> None:
    """The mesh fits the process count, and the model splits over its tensor-parallel and pipeline dimensions."""
    layout = resolve_layout(cfg.parallel, cfg.parallel.world_size)
    if layout.pp > 1:
        check_pipeline(cfg, spec, args, layout.dp)
    tp = layout.tp
    if tp == 1:
        return
    for key in ("n_heads", "kv_heads"):
        heads = getattr(args, key, None)
        if heads is not None and heads % tp:
            name = "n_kv_heads" if key == "kv_heads" else key
            raise ConfigError(
                f"parallel.tp: {tp} does not divide model.{name} ({heads}); each tensor-parallel rank takes whole "
                f"heads: choose a tp that divides it"
            )
    if getattr(args, "tie_embeddings", False):
        raise ConfigError(
            "parallel.tp: tied embeddings are not split by tensor parallel; set model.tie_embeddings=false"
        )


def check_low_precision(cfg: Config) -> None:
    """FSDP2's mixed-precision keys only where FSDP2 shards the model; train.fp8 only where float8 matmuls run."""
    layout = resolve_layout(cfg.parallel, cfg.parallel.world_size)
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        if getattr(cfg.parallel, key) is not None and not layout.fsdp:
            raise ConfigError(
                f"parallel.{key}: applies only to FSDP2 (data parallel with dp_shard, tp or pp > 1), and this layout "
                f"({layout.describe()}) has none; remove it (train.precision=bf16 gives bf16 autocast without FSDP2)"
            )
    problem = cfg.train.fp8 and fp8_problem(cfg.train.device, layout.tp)
    if problem:
        raise ConfigError(problem)


def check_pipeline(cfg: Config, spec: ModelSpec, args: BaseModel, dp: int) -> None:
    """The model splits into the pipeline's stages, and each step's batch into its micro-batches."""
    par = cfg.parallel
    if spec.pipeline is None:
        raise ConfigError(f"parallel.pp: a {spec.name!r} model does not split into pipeline stages; set parallel.pp=1")
    if getattr(args, "tie_embeddings", False):
        raise ConfigError(
            "parallel.pp: tied embeddings would live on both the first and the last stage, whose gradients pipeline "
            "parallel does not add up; set model.tie_embeddings=false"
        )
    if cfg.observe.audit_every:
        raise ConfigError(
            "observe.audit_every: the bias audit scores batches of sentences of any length and count, which do not "
            "split into pipeline micro-batches; set observe.audit_every=0 and run `keel audit RUN_DIR` on the run"
        )
    if (par.pp_stages_per_rank or 1) > 1 and par.pp_schedule != "interleaved_1f1b":
        raise ConfigError(
            f"parallel.pp_stages_per_rank: {par.pp_schedule} runs one stage per rank; "
            "set parallel.pp_schedule=interleaved_1f1b or leave pp_stages_per_rank empty"
        )
    if getattr(args, "vocab_size", None) == 0:  # not resolved yet (keel launch): the block count does not depend on it
        args = args.model_copy(update={"vocab_size": 1})
    with torch.device("meta"):
        blocks = len(spec.shard_units(spec.build(args)))
    stages = par.pipeline_stages
    if stages > blocks:
        raise ConfigError(
            f"parallel.pp: {stages} pipeline stages (pp {par.pp} x {stages // par.pp} per rank) but the model has "
            f"{blocks} blocks, and every stage needs one; lower parallel.pp (or pp_stages_per_rank) or add blocks"
        )
    micro = par.pipeline_microbatches
    batch = cfg.train.micro_batch_size or split_batch(cfg.train.global_batch_size, dp)
    if batch % micro:
        raise ConfigError(
            f"parallel.pp_microbatches: {micro} does not divide the {batch} sequences of each pipeline step "
            "(train.micro_batch_size, or train.global_batch_size / data-parallel ranks); choose a divisor of it"
        )
    if par.pp_schedule == "1f1b" and micro < par.pp:
        raise ConfigError(
            f"parallel.pp_microbatches: 1f1b needs at least one micro-batch per pipeline rank ({par.pp}), not "
            f"{micro}; raise it (or use parallel.pp_schedule=gpipe)"
        )
    rounds = max(1, micro // par.pp)
    if par.pp_schedule == "interleaved_1f1b" and micro % rounds:
        raise ConfigError(
            f"parallel.pp_microbatches: interleaved_1f1b runs micro-batches in rounds of about pp ({par.pp}), "
            f"and {micro} does not split into {rounds} rounds; choose a multiple of parallel.pp"
        )


def check_data(cfg: Config) -> None:
    """The splits the workers read hold at least one sample each; the batch and the mixture weights split."""
    dp = resolve_layout(cfg.parallel, cfg.parallel.world_size).dp
    split_batch(cfg.train.global_batch_size, dp, cfg.train.micro_batch_size)
    train = [TokenDataset(d, "train") for d in cfg.data.mixture] or [TokenDataset(cfg.data.dataset, "train")]
    for dataset in train:
        num_samples(dataset, cfg.train.seq_len)
    if cfg.data.mixture:
        MixtureOrder(list(cfg.data.mixture.values()), cfg.run.seed)
    val = TokenDataset(cfg.data.dataset, "val")
    if cfg.train.eval_every:
        num_samples(val, cfg.train.seq_len)


def check_audit(cfg: Config) -> None:
    """observe.audit_every's template file parses: a bad one is one line naming the file and line."""
    if cfg.observe.audit_every:
        try:
            load_templates(cfg.observe.audit_templates)
        except DataError as e:
            raise DataError(f"observe.audit_templates: {e}") from None


def check_init_from_hf(cfg: Config, spec: ModelSpec, args: BaseModel) -> None:
    """checkpoint.init_from_hf agrees with [model] and holds readable safetensors, where a fresh start will load it."""
    if cfg.checkpoint.init_from_hf and not committed_steps(RunDir(cfg.run_dir).checkpoints):
        check_hf_dir(Path(cfg.checkpoint.init_from_hf), spec, args)


def check_same_model(saved: Config, cfg: Config) -> None:
    """A resume loads the run's checkpoints into its model: refuse a `--set` that changes the model once one exists."""
    if not committed_steps(RunDir(cfg.run_dir).checkpoints):
        return
    (spec, before), (new_spec, after) = model_args(saved.model_section()), model_args(cfg.model_section())
    if spec.name != new_spec.name:
        raise ConfigError(f"model.name: the run's checkpoints hold a {spec.name!r} model, not {new_spec.name!r}")
    for key, value in before.model_dump().items():
        if getattr(after, key) != value:
            raise ConfigError(
                f"model.{key}: the run's checkpoints hold a model with {key} = {value!r}, not "
                f"{getattr(after, key)!r}; a resume cannot change the model (start a new run instead)"
            )


def check_environment(cfg: Config) -> None:
    """The run dir is writable; the devices, exporter ports and W&B login the workers need are there."""
    check_writable_dir(cfg.run_dir, "run dir", LaunchError)
    # Processes on this machine: an external torchrun says how many; `keel train` starts parallel.nproc.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parallel.nproc))
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("train.device is 'cuda' but no CUDA device is visible; set train.device=cpu or auto")
    if cfg.train.device != "cpu" and torch.cuda.is_available() and local > torch.cuda.device_count():
        raise LaunchError(f"parallel.nproc {local} exceeds the {torch.cuda.device_count()} visible GPUs; lower --nproc")
    if cfg.observe.prometheus:
        check_ports(cfg.observe.prometheus_host, cfg.observe.prometheus_port, local)
    if cfg.observe.wandb:
        check_wandb()
