"""What a model card says, gathered from a run dir: config, checkpoint, metrics, events, ledger, results, data.

RUN_DIR/eval.json and RUN_DIR/audit.json are where an evaluation and a bias audit leave their results for the
card (the schema is below and in docs/cards.md); a run without them is "not evaluated" / "not audited".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.checkpoint.commit import committed_steps
from keel.config import Config, validation_message
from keel.config_toml import load_config
from keel.data.manifest import Manifest, load_manifest, manifest_sha256
from keel.errors import CheckpointError, KeelError
from keel.io import read_jsonl
from keel.models import model_args
from keel.observe.energy import recorded_totals
from keel.observe.heartbeat import read_status
from keel.resilience.goodput import RunLedger, run_ledger
from keel.rundir import RunDir


class Result(BaseModel):
    """One figure of an evaluation or audit; any other fields (group, split, samples, ...) are shown as given."""

    model_config = ConfigDict(extra="allow")
    metric: str = Field(min_length=1)
    value: float


class EvalResult(Result):
    """One evaluation result: the task and dataset it was measured on, for the Hub's model-index too."""

    dataset: str = Field(min_length=1)
    task: str = "text-generation"


class EvalFile(BaseModel):
    """RUN_DIR/eval.json: results of evaluating the checkpoint at `step`."""

    step: int | None = None
    results: list[EvalResult]


class AuditFile(BaseModel):
    """RUN_DIR/audit.json: bias-audit results of the checkpoint at `step`, the method, and notes."""

    step: int | None = None
    method: str | None = None
    results: list[Result]
    notes: str | None = None


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
    energy: dict[str, float]  # energy_kwh, energy_estimated_kwh, device_hours: the run's totals
    power_sources: list[dict[str, Any]]  # each rank's newest `power_source` event
    world_size: int
    ledger: RunLedger | None
    evaluation: EvalFile | None
    audit: AuditFile | None
    datasets: list[tuple[Path, Manifest | str]]  # each dataset's manifest, or why it cannot be described

    @property
    def tokens(self) -> int:
        """Tokens the described model was trained on: steps x global batch x sequence length."""
        return self.step * self.cfg.train.global_batch_size * self.cfg.train.seq_len


def _results(path: Path, schema: type[BaseModel]) -> Any:
    if not path.is_file():
        return None
    try:
        return schema.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeelError(f"{path}: not valid JSON ({e}); fix or remove it (schema in docs/cards.md)") from None
    except ValidationError as e:
        message = validation_message(e, schema)
        raise KeelError(f"{path}: malformed: {message}; fix or remove it (schema in docs/cards.md)") from None


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
        val_loss=[(r["step"], r["val_loss"]) for r in read_jsonl(run.metrics) if "val_loss" in r and r["step"] <= step],
        energy=recorded_totals(run),
        power_sources=[sources[rank] for rank in sorted(sources)],
        world_size=world_size,
        ledger=ledger,
        evaluation=_results(run.evaluation, EvalFile),
        audit=_results(run.audit, AuditFile),
        datasets=[(Path(d), _dataset(Path(d), hashes.get(d))) for d in datasets],
    )


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
