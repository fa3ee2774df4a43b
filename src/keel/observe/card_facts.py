"""What a model card says, gathered from a run dir: config, checkpoint, metrics, events, ledger, results, data.

RUN_DIR/eval.json and RUN_DIR/audit.json (`keel eval`, `keel audit`) are read by keel.observe.card_results; a run
without them is "not evaluated" / "not audited".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.checkpoint.commit import committed_steps
from keel.config import Config
from keel.config_toml import load_config
from keel.data.manifest import Manifest, load_manifest, manifest_sha256
from keel.errors import CheckpointError, KeelError
from keel.io import read_jsonl
from keel.models import model_args
from keel.observe.card_results import AuditFile, EvalFile, read_results
from keel.observe.energy import recorded_totals
from keel.observe.heartbeat import read_status
from keel.resilience.goodput import RunLedger, run_ledger
from keel.rundir import RunDir


@dataclass(frozen=True)
class RunFacts:
    """Everything a model card states about a run, read from its run dir."""

    run: RunDir
    cfg: Config
    step: int  # the newest committed checkpoint: the model the card describes
    state: str  # how the run stands (status.json)
    params: int
    tokenizer: dict[str, Any]
    val_loss: list[tuple[int, float]]  # (step, validation loss) up to `step`
    val_parts: tuple[int, dict[str, float]]  # training's newest per-source / per-mixture validation losses, by name
    audit_gaps: tuple[int, dict[str, float]]  # training's newest probe gaps (observe.audit_every), by axis
    energy: dict[str, float]  # energy_kwh, energy_estimated_kwh, device_hours: the run's totals
    power_sources: list[dict[str, Any]]  # each rank's newest `power_source` event
    world_size: int
    device_type: str  # where the newest attempt trained: "cpu", "cuda"
    precision: str  # what the newest attempt trained in (its start event; train.precision for older runs)
    ledger: RunLedger | None
    evaluation: EvalFile | None
    audit: AuditFile | None
    datasets: list[tuple[Path, Manifest | str]]  # each dataset's manifest, or why it cannot be described

    @property
    def tokens(self) -> int:
        """Tokens the described model was trained on: steps x global batch x sequence length."""
        return self.step * self.cfg.train.global_batch_size * self.cfg.train.seq_len


def _tokenizer(run: RunDir) -> dict[str, Any]:
    """The run's tokenizer: its model type, pre-tokenizer, vocabulary size."""
    data = json.loads(run.tokenizer.read_text(encoding="utf-8"))
    pre = data.get("pre_tokenizer") or {}
    vocab = data.get("model", {}).get("vocab", {})
    added = {t["content"] for t in data.get("added_tokens", [])}
    return {
        "type": data.get("model", {}).get("type", "unknown"),
        "pre_tokenizer": pre.get("type", "none"),
        "vocab_size": len(vocab) + len(added - set(vocab)),
        "special": sorted(added),
    }


def committed(run_dir: Path) -> list[int]:
    """The run's committed checkpoint steps; a CheckpointError if it has none (no model to describe yet)."""
    run = RunDir(run_dir).require(CheckpointError)
    steps = committed_steps(run.checkpoints)
    if not steps:
        raise CheckpointError(
            f"{run.root}: no committed checkpoint, so no model to describe; train it (keel train --resume "
            f"{run.root}) until it saves one, then run `keel card {run.root}`"
        )
    return steps


def gather(run_dir: Path, step: int | None = None) -> RunFacts:
    """The facts of the run in `run_dir` and its checkpoint at `step` (the newest when None)."""
    steps, run = committed(run_dir), RunDir(run_dir)
    if step is not None and step not in steps:
        raise CheckpointError(f"{run.root}: no committed checkpoint at step {step}; committed steps: {steps}")
    step = steps[-1] if step is None else step
    cfg = load_config(run.config)
    spec, args = model_args(cfg.model_section())
    events = read_jsonl(run.events)
    records = [r for r in read_jsonl(run.metrics) if r.get("step", 0) <= step]
    starts = [e for e in events if e.get("event") == "start"]
    world_size = int(starts[-1].get("world_size", cfg.parallel.nproc)) if starts else cfg.parallel.nproc
    # Each rank's newest source: the attempt that ran last (a resume may have used fewer ranks).
    sources = {e["rank"]: e for e in events if e.get("event") == "power_source" and e.get("rank", 0) < world_size}
    try:
        ledger = run_ledger(run)
    except KeelError:  # a run from before the ledger, or one that never reached a checkpoint or its end
        ledger = None
    hashes = {cfg.data.dataset: cfg.data.manifest_sha256, **cfg.data.mixture_sha256}
    datasets = list(cfg.data.mixture or [cfg.data.dataset])
    if cfg.data.mixture and cfg.data.dataset not in cfg.data.mixture:
        datasets.append(cfg.data.dataset)  # validation data
    return RunFacts(
        run=run,
        cfg=cfg,
        step=step,
        state=str(read_status(run.root).get("state", "unknown")),
        params=spec.num_params(args),
        tokenizer=_tokenizer(run),
        val_loss=[(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
        val_parts=_newest(records, ("val_loss/", "val_loss_mixture/")),
        audit_gaps=_newest(records, ("audit_gap/",)),
        energy=recorded_totals(run),
        power_sources=[sources[rank] for rank in sorted(sources)],
        world_size=world_size,
        device_type=str(starts[-1].get("device", "cpu") if starts else "cpu").split(":")[0],
        # auto is resolved at start-up (on CPU by measuring), so only the run knows what it chose.
        precision=str(starts[-1].get("precision", cfg.train.precision) if starts else cfg.train.precision),
        ledger=ledger,
        evaluation=read_results(run.eval_results, EvalFile),
        audit=read_results(run.audit_results, AuditFile),
        datasets=[(Path(d), _dataset(Path(d), hashes.get(d))) for d in datasets],
    )


def _newest(records: list[dict[str, Any]], prefixes: tuple[str, ...]) -> tuple[int, dict[str, float]]:
    """The newest record's metrics named `<prefix><member>` for these prefixes, and its step; (0, {}) if none."""
    for record in reversed(records):
        found = {k: float(v) for k, v in record.items() if k.startswith(prefixes) and isinstance(v, (int, float))}
        if found:
            return record["step"], found
    return 0, {}


def _dataset(root: Path, trained_on: str | None) -> Manifest | str:
    """A dataset's manifest, or why the card cannot describe it as the run saw it (gone, or changed since)."""
    try:
        manifest = load_manifest(root)
        digest = manifest_sha256(root)
    except KeelError as e:
        return f"cannot be read now ({e})"
    if trained_on is not None and digest != trained_on:
        removed = len(manifest.removals)
        return (
            f"has changed since the run started (manifest {digest[:12]}, the run trained on {trained_on[:12]}; "
            f"{removed} removals recorded): the model was trained on the earlier version"
        )
    return manifest
