"""Preflight: resolve a config against its dataset and model, and create or reopen the run dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from keel.config import Config, build_config, load_config, save_config
from keel.data.dataset import load_manifest, manifest_sha256
from keel.errors import ConfigError, DataError
from keel.models import model_args

CONFIG_FILE = "config.toml"


def resolve(cfg: Config) -> Config:
    """Fill what the config leaves to the data (vocab size, manifest hash, absolute paths) and check it all fits."""
    dataset = Path(cfg.data.dataset).resolve()
    manifest = load_manifest(dataset)
    digest = manifest_sha256(dataset)
    if cfg.data.manifest_sha256 not in (None, digest):
        raise DataError(
            f"data.dataset {dataset} has changed since this run started (manifest hash {digest[:12]}, "
            f"the run expects {cfg.data.manifest_sha256[:12]}); point data.dataset at the original data"
        )
    raw = cfg.model_dump()
    vocab = manifest["tokenizer"]["vocab_size"]
    model = raw["model"]
    if not model.get("vocab_size"):
        model["vocab_size"] = vocab
    elif model["vocab_size"] < vocab:
        raise ConfigError(f"model.vocab_size {model['vocab_size']} is smaller than the tokenizer's {vocab}")
    _, args = model_args(model)
    max_len = getattr(args, "max_seq_len", None)
    if max_len is not None and cfg.train.seq_len > max_len:
        raise ConfigError(f"train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len {max_len}")
    raw["data"].update(dataset=str(dataset), manifest_sha256=digest)
    raw["run"]["dir"] = str(cfg.run_dir.resolve())
    resolved = build_config(raw)
    check_batch(resolved, resolved.parallel.nproc)
    return resolved


def check_batch(cfg: Config, world_size: int) -> None:
    """The global batch must split evenly over ranks and micro-batches."""
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"train.global_batch_size {global_batch} does not split over {world_size} processes; "
            "make it a multiple of parallel.nproc"
        )
    if micro is not None and (global_batch // world_size) % micro:
        raise ConfigError(
            f"train.micro_batch_size {micro} does not divide the per-rank batch "
            f"{global_batch // world_size} (train.global_batch_size / parallel.nproc)"
        )


def start_run(cfg: Config) -> Config:
    """Resolve a fresh run's config and create its run dir; never overwrite an existing run."""
    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    if (run_dir / CONFIG_FILE).exists():
        raise ConfigError(
            f"run dir {run_dir} already holds a run; continue it with `keel train --resume {run_dir}` "
            "or choose another run.name"
        )
    for sub in ("checkpoints", "logs"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(cfg.data.dataset) / "tokenizer.json", run_dir / "tokenizer.json")
    save_config(cfg, run_dir / CONFIG_FILE)
    return cfg


def reopen_run(run_dir: Path, overrides: list[str] = ()) -> Config:
    """Load a run dir's resolved config for a resume, with `--set` overrides applied and recorded."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not a Keel run dir")
    cfg = load_config(run_dir / CONFIG_FILE, [*overrides, f"run.dir={str(run_dir.resolve())!r}"])
    cfg = resolve(cfg)
    save_config(cfg, run_dir / CONFIG_FILE)
    return cfg
