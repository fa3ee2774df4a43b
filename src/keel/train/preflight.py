"""Preflight: resolve a config against its data, model and machine, check it all, then create or reopen the run dir.

Nothing is created until every check has passed, so a refused command leaves no run behind and its corrected
version starts cleanly; a worker that still fails has found something no check could see in advance.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from keel.config import CardConfig, Config
from keel.config_toml import apply_overrides, build_config, load_config, read_toml, save_config
from keel.data.manifest import load_manifest, manifest_sha256, resolve_inside
from keel.errors import ConfigError, DataError
from keel.io import filesystem_errors
from keel.models import model_args
from keel.resilience.inject import parse_faults
from keel.rundir import RunDir
from keel.train.checks import (
    check_audit,
    check_data,
    check_environment,
    check_file_hash,
    check_init_from_hf,
    check_layout,
    check_low_precision,
    check_same_model,
    check_tokenizer,
    mixture_hashes,
)
from keel.train.planning import check_fits


def resolve(cfg: Config) -> Config:
    """Fill what the config leaves to the data (vocab size, manifest hashes, absolute paths) and check it all fits."""
    dataset = Path(cfg.data.dataset).resolve()
    manifest = load_manifest(dataset)
    digest = manifest_sha256(dataset)
    if cfg.data.manifest_sha256 not in (None, digest):
        raise DataError(
            f"data.dataset {dataset} has changed since this run started (manifest hash {digest[:12]}, "
            f"the run expects {cfg.data.manifest_sha256[:12]}); point data.dataset at the original data"
        )
    check_tokenizer(dataset, manifest)
    # Absolute, so a resume from any directory finds the same data; hashed, so it refuses changed data.
    mixture = {str(Path(d).resolve()): weight for d, weight in cfg.data.mixture.items()}
    hashes = mixture_hashes(mixture, cfg.data.mixture_sha256, manifest.tokenizer.sha256)
    raw = cfg.model_dump()
    vocab = manifest.tokenizer.vocab_size
    model = raw["model"]
    if not model.get("vocab_size"):
        model["vocab_size"] = vocab
    elif model["vocab_size"] < vocab:
        raise ConfigError(f"model.vocab_size {model['vocab_size']} is smaller than the tokenizer's {vocab}")
    spec, args = model_args(model)
    max_len = getattr(args, "max_seq_len", None)
    if max_len is not None and cfg.train.seq_len > max_len:
        raise ConfigError(f"train.seq_len {cfg.train.seq_len} exceeds model.max_seq_len {max_len}")
    raw["data"].update(dataset=str(dataset), manifest_sha256=digest, mixture=mixture, mixture_sha256=hashes)
    raw["run"]["dir"] = str(cfg.run_dir.resolve())
    if cfg.checkpoint.init_from_hf:
        raw["checkpoint"]["init_from_hf"] = str(Path(cfg.checkpoint.init_from_hf).resolve())
    if cfg.observe.audit_templates:
        raw["observe"]["audit_templates"] = str(Path(cfg.observe.audit_templates).resolve())
    resolved = build_config(raw)
    try:
        parse_faults(resolved.resilience.inject, resolved.parallel.world_size)
    except ValueError as e:
        raise ConfigError(f"resilience.inject: {e}") from None
    check_layout(resolved, spec, args)
    check_low_precision(resolved)
    check_fits(resolved)
    check_data(resolved)
    check_audit(resolved)
    check_init_from_hf(resolved, spec, args)
    check_environment(resolved)
    return resolved


# Keys that may differ between invocations of one run: where it stops, how many processes and machines it uses,
# and what its model card states (prices, carbon intensity, intended use), none of which shapes training.
PER_INVOCATION = {
    ("train", "stop_after"),
    ("parallel", "nproc"),
    ("parallel", "nnodes"),
    ("observe", "price_per_device_hour"),
    ("observe", "grid_gco2_per_kwh"),
    *(("card", key) for key in CardConfig.model_fields),
}


def start_run(cfg: Config) -> tuple[Config, bool]:
    """Resolve and check a run's config and create its run dir; returns it and whether the run continues.

    A run dir that already holds this very run (a requeued job, a launcher started again) is continued from
    its newest checkpoint; a run dir that holds another run is never touched.
    """
    cfg = resolve(cfg)
    run = RunDir(cfg.run_dir)
    if run.is_run():
        check_same_run(load_config(run.config), cfg)
        with filesystem_errors("update the run's config"):
            save_config(cfg, run.config)  # this invocation's stop_after and process count
        return cfg, True
    dataset = Path(cfg.data.dataset)
    tokenizer = resolve_inside(dataset, load_manifest(dataset).tokenizer.file)  # as resolve checked it
    with filesystem_errors("create the run dir"):
        for sub in (run.checkpoints, run.logs):
            sub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, run.tokenizer)
        save_config(cfg, run.config)  # last: only a run dir whose config is written holds a run
    return cfg, False


def check_same_run(saved: Config, cfg: Config) -> None:
    """Refuse to continue a run dir with another config: one line naming the first key that differs."""
    before, after = saved.model_dump(), cfg.model_dump()
    for section, table in after.items():
        for key, value in table.items():
            if (section, key) not in PER_INVOCATION and before.get(section, {}).get(key) != value:
                raise ConfigError(
                    f"run dir {cfg.run_dir} already holds a run with {section}.{key} = "
                    f"{before.get(section, {}).get(key)!r}, not {value!r}; continue it with `keel train --resume "
                    f"{cfg.run_dir}` (which may change it with --set) or choose another run.name"
                )


def reopened(run_dir: Path, overrides: list[str] = ()) -> Config:
    """A run dir's resolved config for a resume, with `--set` overrides applied and checked (nothing written)."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise ConfigError(f"--resume {run.root}: no {run.config.name} there, so it is not a Keel run dir")
    table = read_toml(run.config)
    # train.stop_after and the machine count belong to the invocation that set them: a resume runs on without.
    table.get("train", {}).pop("stop_after", None)
    table.get("parallel", {}).pop("nnodes", None)
    table = apply_overrides(table, [*overrides, f"run.dir={str(run.root.resolve())!r}"])
    cfg = build_config(table, str(run.config))
    check_same_model(load_config(run.config), cfg)
    cfg = resolve(cfg)
    # Generation and export decode with the run's copy of the tokenizer: it must still be the dataset's.
    tokenizer_sha256 = load_manifest(cfg.data.dataset).tokenizer.sha256
    check_file_hash(run.tokenizer, tokenizer_sha256, f"copy the tokenizer.json of {cfg.data.dataset} back into the run")
    return cfg


def reopen_run(run_dir: Path, overrides: list[str] = ()) -> Config:
    """Load a run dir's resolved config for a resume, with `--set` overrides applied, checked and recorded."""
    cfg = reopened(run_dir, overrides)
    with filesystem_errors("update the run's config"):
        save_config(cfg, RunDir(run_dir).config)
    return cfg


def join_run(cfg: Config) -> Config:
    """On a node other than node 0: wait until node 0's run dir holds this very run (a resolved, checked `cfg`).

    Node 0 alone creates or updates the run dir, on storage every node shares; a mismatch may be node 0 still
    writing this invocation's config, so it is only an error once `distributed.join_timeout_s` has passed.
    """
    run, timeout = RunDir(cfg.run_dir), cfg.distributed.join_timeout_s
    deadline = time.monotonic() + timeout
    while True:
        problem = ConfigError(
            f"run dir {run.root}: node 0 has not created it within distributed.join_timeout_s ({timeout:g} s); "
            "start node 0 too, and keep the run dir on storage every node shares"
        )
        if run.is_run():
            try:
                check_same_run(load_config(run.config), cfg)
                return cfg
            except ConfigError as e:
                problem = e
        if time.monotonic() >= deadline:
            raise problem
        time.sleep(0.5)
