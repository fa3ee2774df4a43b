"""Preflight: resolve a config against its dataset and model, and create or reopen the run dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from keel.config import Config, build_config, load_config, save_config, split_batch
from keel.data.manifest import load_manifest, manifest_sha256
from keel.errors import ConfigError, DataError
from keel.models import model_args
from keel.rundir import RunDir


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
    vocab = manifest.tokenizer.vocab_size
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
    split_batch(resolved.train.global_batch_size, resolved.parallel.nproc, resolved.train.micro_batch_size)
    return resolved


def start_run(cfg: Config) -> Config:
    """Resolve a fresh run's config and create its run dir; never overwrite an existing run."""
    cfg = resolve(cfg)
    run = RunDir(cfg.run_dir)
    if run.is_run():
        raise ConfigError(
            f"run dir {run.root} already holds a run; continue it with `keel train --resume {run.root}` "
            "or choose another run.name"
        )
    for sub in (run.checkpoints, run.logs):
        sub.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(cfg.data.dataset) / "tokenizer.json", run.tokenizer)
    save_config(cfg, run.config)
    return cfg


def reopen_run(run_dir: Path, overrides: list[str] = ()) -> Config:
    """Load a run dir's resolved config for a resume, with `--set` overrides applied and recorded."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise ConfigError(f"--resume {run.root}: no {run.config.name} there, so it is not a Keel run dir")
    cfg = load_config(run.config, [*overrides, f"run.dir={str(run.root.resolve())!r}"])
    cfg = resolve(cfg)
    save_config(cfg, run.config)
    return cfg
