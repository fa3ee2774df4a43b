"""`keel eval RUN_DIR`: validation loss and perplexity per source and mixture dataset, from a checkpoint, on demand."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from keel.checkpoint.inference import checkpoint_path, load_model
from keel.data.manifest import manifest_sha256
from keel.errors import CheckpointError
from keel.eval.harness import Harness
from keel.eval.sources import short_names
from keel.eval.validation import eval_splits, perplexity, split_loss
from keel.io import atomic_write_json, filesystem_errors
from keel.observe.events import EventLog
from keel.rundir import RunDir, step_of

FORMAT = "keel-eval/1"


def _loss(loss: float | None, tokens: int) -> dict[str, Any]:
    return {"tokens": tokens, "val_loss": loss, "val_ppl": None if loss is None else perplexity(loss)}


def evaluate_run(
    run_dir: Path,
    step: int | None = None,
    batches: int | None = None,
    harness: list[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Evaluate checkpoint `step` (newest when None) in this process; write RUN_DIR/eval.json and an `eval` event."""
    run = RunDir(run_dir).require(CheckpointError)
    path = checkpoint_path(run.root, step)
    tasks = Harness(harness, limit) if harness else None  # a bad task is refused before any work
    step = step_of(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(run.root, step, device=str(device))
    if batches is not None:
        cfg.train.eval_batches = batches
    train = cfg.train
    # The windows training validated on (the first eval_batches global batches), read micro batch by micro batch.
    micro = train.micro_batch_size or max(1, train.global_batch_size // cfg.parallel.nproc)
    splits = eval_splits(cfg)
    losses = [split_loss(model, s, cfg, device, contextlib.nullcontext, None, micro) for s in splits]
    main, sources = losses[0], splits[0].sources
    by_dir = {str(Path(s.dataset.dir).resolve()): r for s, r in zip(splits, losses, strict=True)}
    mixture = []
    for (directory, weight), name in zip(cfg.data.mixture.items(), short_names(list(cfg.data.mixture)), strict=True):
        result = by_dir.get(str(Path(directory).resolve()))  # None: its val split was too short to evaluate
        entry = _loss(result.loss, result.tokens) if result else _loss(None, 0)
        mixture.append({"name": name, "dataset": directory, "weight": weight, **entry})
    record: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(path.resolve()),
        "dataset": cfg.data.dataset,
        "manifest_sha256": manifest_sha256(cfg.data.dataset),
        "seq_len": train.seq_len,
        "samples": train.eval_batches * train.global_batch_size,
        **_loss(main.loss, main.tokens),
        "sources": [
            {"name": name, "glob": glob, **_loss(main.source_loss(k), main.source_tokens[k])}
            for k, (name, glob) in enumerate(zip(sources.names, sources.globs, strict=True))
        ]
        if sources
        else [],
        "mixture": mixture,
    }
    if tasks is not None:
        record["harness"] = tasks.run(run.root, step)
    with filesystem_errors("write the evaluation results"):
        atomic_write_json(run.eval_results, record)
    EventLog(run.events)("eval", step=step, val_loss=main.loss, file=run.eval_results.name)
    return record


def eval_lines(record: dict[str, Any]) -> list[str]:
    """The human-readable summary of an eval.json record."""

    def loss(entry: dict[str, Any]) -> str:
        if entry["val_loss"] is None:
            return "not evaluated (no tokens)"
        return f"val_loss {entry['val_loss']:.4f} (ppl {entry['val_ppl']:,.1f}) over {entry['tokens']:,} tokens"

    lines = [f"step {record['step']}: {loss(record)}"]
    lines += [f"  source {s['name']}: {loss(s)}" for s in record["sources"]]
    lines += [f"  mixture {m['name']} (weight {m['weight']:g}): {loss(m)}" for m in record["mixture"]]
    for task, metrics in record.get("harness", {}).get("tasks", {}).items():
        scores = ", ".join(
            f"{k} {v:.4f}" + (f" +- {metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
            for k, v in metrics.items()
            if k != "samples" and not k.endswith("_stderr")
        )
        lines.append(f"  harness {task}: {scores} ({metrics.get('samples', '?')} samples)")
    return lines
