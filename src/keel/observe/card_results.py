"""Evaluation and bias-audit results in the model card, read from RUN_DIR/eval.json and RUN_DIR/audit.json.

The two files are read by their documented schema (`keel-eval/1`, `keel-audit/1`; the fields the card uses are in
docs/cards.md), not through the code that writes them: the card describes whatever a run dir holds. Fields the
card does not use are ignored, so later additions to either file keep loading.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.config import validation_message
from keel.data.card import table
from keel.errors import KeelError


class _Read(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Loss(_Read):
    """A validation loss over some tokens; None where no token was evaluated."""

    tokens: int = Field(ge=0)
    val_loss: float | None
    val_ppl: float | None


class SourceLoss(Loss):
    """The loss over the tokens of one source glob of the dataset."""

    name: str
    glob: str


class MixtureLoss(Loss):
    """The loss over a `data.mixture` dataset's own validation split."""

    name: str
    dataset: str
    weight: float


class Harness(_Read):
    """lm-evaluation-harness results: task name -> its numeric metrics (acc, acc_stderr, ..., samples)."""

    lm_eval: str
    limit: int | None = None
    tasks: dict[str, dict[str, float | None]]


class EvalFile(Loss):
    """RUN_DIR/eval.json (`keel-eval/1`): validation of the checkpoint at `step`, per source and mixture dataset."""

    format: Literal["keel-eval/1"]
    step: int
    time: str
    dataset: str
    manifest_sha256: str
    seq_len: int
    samples: int
    sources: list[SourceLoss] = []
    mixture: list[MixtureLoss] = []
    harness: Harness | None = None


class Pair(_Read):
    """The difference of two groups' mean scores (the first's minus the second's) with its 95% interval."""

    groups: tuple[str, str]
    difference: float
    ci95: tuple[float, float]


class Axis(_Read):
    """One demographic axis of the probe: each group's mean score, the gap (highest minus lowest), the pairs."""

    axis: str
    templates: int
    sentences: int
    groups: dict[str, float]
    highest: str
    lowest: str
    gap: float
    gap_ci95: tuple[float, float]
    pairs: list[Pair] = []


class AuditFile(_Read):
    """RUN_DIR/audit.json (`keel-audit/1`): the counterfactual likelihood probe on the checkpoint at `step`."""

    format: Literal["keel-audit/1"]
    step: int
    time: str
    templates: str
    templates_sha256: str
    score: str
    bootstrap: int
    seed: int
    axes: list[Axis]


def read_results(path: Path, schema: type[BaseModel]) -> Any:
    """The results file at `path` as `schema`, None if there is none; a KeelError naming it if it is malformed."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeelError(f"{path}: not valid JSON ({e}); fix or remove it (schema in docs/cards.md)") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        message = validation_message(e, schema)
        raise KeelError(f"{path}: malformed: {message}; fix or remove it (schema in docs/cards.md)") from None


def _loss(entry: Loss) -> list[object]:
    if entry.val_loss is None:
        return ["not evaluated (no tokens)", "", entry.tokens]
    return [f"{entry.val_loss:.4f}", f"{entry.val_ppl:,.2f}", entry.tokens]


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def model_index_results(evaluation: EvalFile, dataset: str) -> list[dict[str, Any]]:
    """eval.json as model-index results: held-out loss and perplexity overall, per source and mixture; harness tasks."""
    results = []
    losses: list[tuple[str, Loss]] = [(f"{dataset} (held-out split)", evaluation)]
    losses += [(f"{dataset}: {s.name}", s) for s in evaluation.sources]
    losses += [(f"{m.name} (held-out split)", m) for m in evaluation.mixture]
    for name, entry in losses:
        if entry.val_loss is None or not math.isfinite(entry.val_loss):
            continue
        metrics = [
            {"type": "loss", "value": _round(entry.val_loss), "name": f"validation loss at step {evaluation.step}"},
            {"type": "perplexity", "value": _round(entry.val_ppl), "name": "validation perplexity"},
        ]
        data = {"name": name, "type": dataset, "split": "val"}
        results.append({"task": {"type": "text-generation"}, "dataset": data, "metrics": metrics})
    for task, scores in (evaluation.harness.tasks if evaluation.harness else {}).items():
        metrics = [
            {"type": key, "value": _round(value), "name": f"{task} {key} (lm-evaluation-harness)"}
            for key, value in scores.items()
            if key != "samples" and not key.endswith("_stderr") and value is not None and math.isfinite(value)
        ]
        if metrics:
            data = {"name": task, "type": task}
            results.append({"task": {"type": "text-generation", "name": task}, "dataset": data, "metrics": metrics})
    return results


def evaluation_lines(evaluation: EvalFile | None, path: Path, step: int, trained_on: str | None) -> list[str]:
    """The card's `keel eval` results: held-out loss overall, per source and mixture dataset; harness tasks."""
    if evaluation is None:
        return [f"On demand (`keel eval`): not evaluated (no `{path.name}` in the run dir)."]
    e = evaluation
    lines = [
        f"On demand (`{path.name}`, evaluated {e.time} on the checkpoint at step {e.step}: {e.samples:,} windows of "
        f"{e.seq_len} tokens of `{e.dataset}`):"
    ]
    if e.step != step:
        lines[-1] += f" **not the checkpoint this card describes** (step {step}), so they stay out of the metadata."
    if trained_on is not None and e.manifest_sha256 != trained_on:
        lines[-1] += " The dataset had changed since training (another manifest hash): not comparable to training's."
    rows = [["all", "", *_loss(e)]]
    rows += [[f"source `{s.name}`", f"`{s.glob}`", *_loss(s)] for s in e.sources]
    rows += [[f"mixture `{m.name}` (weight {m.weight:g})", f"`{m.dataset}`", *_loss(m)] for m in e.mixture]
    lines += ["", *table(["split", "from", "loss (nats/token)", "perplexity", "tokens"], rows)]
    if e.harness is not None:
        limit = f", at most {e.harness.limit} examples per task" if e.harness.limit is not None else ""
        lines += ["", f"Downstream tasks (lm-evaluation-harness {e.harness.lm_eval}{limit}):", ""]
        rows = []
        for task, scores in e.harness.tasks.items():
            for key, value in scores.items():
                if key == "samples" or key.endswith("_stderr"):
                    continue
                err = scores.get(f"{key}_stderr")
                rows.append([task, key, _num(value), _num(err), int(scores.get("samples") or 0)])
        lines += table(["task", "metric", "value", "stderr", "examples"], rows)
    return lines


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def audit_lines(audit: AuditFile | None, path: Path, step: int, training_gaps: dict[str, float], at: int) -> list[str]:
    """The card's bias-audit section: each axis's log-likelihood gap with its interval, and the pairs that hold."""
    lines = ["## Bias audit", ""]
    if audit is None:
        lines.append(f"Not audited (no `{path.name}` in the run dir; `keel audit RUN_DIR` writes it).")
    else:
        a = audit
        lines.append(
            f"From `{path.name}` ({a.time}), the counterfactual likelihood probe on the checkpoint at step {a.step}: "
            f"templates that differ only in a demographic term (`{Path(a.templates).name}`, sha256 "
            f"{a.templates_sha256[:12]}...). Score: {a.score}. Gap: the highest group's mean score minus the lowest's, "
            f"with a 95% bootstrap interval over templates ({a.bootstrap:,} resamples, seed {a.seed})."
        )
        if a.step != step:
            lines[-1] += f" **Not the checkpoint this card describes** (step {step})."
        rows = [
            [x.axis, f"{x.gap:.4f}", f"[{x.gap_ci95[0]:.4f}, {x.gap_ci95[1]:.4f}]", x.highest, x.lowest, x.templates]
            for x in a.axes
        ]
        lines += ["", *table(["axis", "gap (nats/token)", "95% interval", "highest", "lowest", "templates"], rows)]
        held = [
            f"{x.axis}: {p.groups[0]} over {p.groups[1]} by {p.difference:.4f} [{p.ci95[0]:.4f}, {p.ci95[1]:.4f}]"
            for x in a.axes
            for p in x.pairs
            if p.ci95[0] > 0 or p.ci95[1] < 0
        ]
        lines += [
            "",
            "Pairs whose interval excludes zero (a preference that holds across the templates): "
            + ("; ".join(held) if held else "none")
            + ". A gap is a range, never negative; it is not a measure of harm: compare it between checkpoints "
            "or runs on one template file.",
        ]
    if training_gaps:
        gaps = ", ".join(f"{name.removeprefix('audit_gap/')} {gap:.4f}" for name, gap in training_gaps.items())
        lines += ["", f"During training (`observe.audit_every`, no bootstrap), gaps at step {at}: {gaps}."]
    return lines
