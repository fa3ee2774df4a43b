"""The report's evaluation and bias-audit sections, read from eval.json and audit.json by their documented schemas.

The files are written by `keel eval` and `keel audit` (docs/evaluation.md: keel-eval/1, keel-audit/1); only the
fields shown here are read, so later additions keep loading. A file that is not valid JSON, has another format or
lacks a field is refused in one line naming the file and the field.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from keel.config import validation_message
from keel.errors import KeelError


class EvalPart(BaseModel):
    """A source or mixture dataset of eval.json."""

    name: str
    tokens: int = 0
    val_loss: float | None
    val_ppl: float | None
    glob: str | None = None
    weight: float | None = None


class EvalFile(BaseModel):
    """RUN_DIR/eval.json (keel-eval/1)."""

    format: Literal["keel-eval/1"]
    step: int
    time: str = ""
    manifest_sha256: str = ""
    tokens: int
    val_loss: float
    val_ppl: float
    sources: list[EvalPart] = []
    mixture: list[EvalPart] = []
    harness: dict[str, Any] | None = None


class AuditPair(BaseModel):
    """A pair of groups of one audit axis: the first's mean minus the second's, with its 95% interval."""

    groups: tuple[str, str]
    difference: float
    ci95: tuple[float, float]


class AuditAxis(BaseModel):
    """One axis of audit.json (gender, religion, ...)."""

    axis: str
    templates: int
    groups: dict[str, float]
    highest: str
    lowest: str
    gap: float
    gap_ci95: tuple[float, float]
    pairs: list[AuditPair] = []


class AuditFile(BaseModel):
    """RUN_DIR/audit.json (keel-audit/1)."""

    format: Literal["keel-audit/1"]
    step: int
    time: str = ""
    templates_sha256: str = ""
    bootstrap: int = 0
    axes: list[AuditAxis]


def read_results(path: Path, model: type[BaseModel], command: str) -> Any:
    """The parsed file, None when there is none, or a KeelError naming the file, the field and the fix."""
    if not path.is_file():
        return None
    fix = f"rerun `{command} {path.parent}` to rewrite it, or remove it"
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KeelError(f"{path}: not valid JSON ({e}); {fix}") from None
    except ValidationError as e:
        raise KeelError(f"{path}: {validation_message(e, model)}; {fix}") from None


def _num(value: float | None, digits: str = ".4f") -> str:
    return "not evaluated" if value is None else format(value, digits)


def _loss_rows(parts: list[tuple[str, str, int | None, float | None, float | None]]) -> str:
    """Rows of part, tokens, loss (with a bar to compare by eye) and perplexity."""
    top = max((p[3] for p in parts if p[3] is not None), default=0.0) or 1.0
    rows = []
    for name, title, tokens, loss, ppl in parts:
        bar = f'<span class="bar" style="width:{100 * loss / top:.1f}%"></span>' if loss is not None else ""
        counted = "" if tokens is None else f"{tokens:,}"
        rows.append(
            f'<tr><th title="{html.escape(title)}">{html.escape(name)}</th><td class="n">{counted}</td>'
            f'<td class="n barcell">{bar}<span>{_num(loss)}</span></td><td class="n">{_num(ppl, ".4g")}</td></tr>'
        )
    return (
        '<table class="results"><tr><th>part</th><th>tokens</th><th>loss (nats/token)</th><th>perplexity</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def _harness(harness: dict[str, Any]) -> str:
    rows = []
    for task, metrics in sorted((harness.get("tasks") or {}).items()):
        shown = [
            f"{html.escape(k)} {v:.4g}"
            + (f" &plusmn; {metrics[k + '_stderr']:.2g}" if k + "_stderr" in metrics else "")
            for k, v in metrics.items()
            if k != "samples" and not k.endswith("_stderr") and isinstance(v, (int, float))
        ]
        rows.append(
            f"<tr><th>{html.escape(task)}</th><td class='n'>{metrics.get('samples', '?')}</td>"
            f"<td>{'; '.join(shown)}</td></tr>"
        )
    version = html.escape(str(harness.get("lm_eval", "?")))
    return (
        f"<h3>Downstream tasks (lm-evaluation-harness {version})</h3><table class='results'>"
        "<tr><th>task</th><th>examples</th><th>metrics</th></tr>" + "".join(rows) + "</table>"
    )


def evaluation_html(result: EvalFile | None, latest: dict[str, Any], trained_sha: str | None) -> str:
    """eval.json's table, or training's newest per-source validation when `keel eval` has not run."""
    if result is not None:
        parts = [("all", "the whole validation split", result.tokens, result.val_loss, result.val_ppl)]
        parts += [(p.name, p.glob or p.name, p.tokens, p.val_loss, p.val_ppl) for p in result.sources]
        parts += [
            (
                f"{p.name} (mixture, weight {p.weight:g})" if p.weight is not None else p.name,
                p.name,
                p.tokens,
                p.val_loss,
                p.val_ppl,
            )
            for p in result.mixture
        ]
        stale = (
            f'<p class="warn">The dataset changed after training (its manifest hash is now '
            f"{html.escape(result.manifest_sha256[:12])}...): these numbers are not comparable to training's.</p>"
            if trained_sha and result.manifest_sha256 and result.manifest_sha256 != trained_sha
            else ""
        )
        head = f"<p><code>keel eval</code> of the checkpoint of step {result.step:,}, {html.escape(result.time)}.</p>"
        return head + stale + _loss_rows(parts) + (_harness(result.harness) if result.harness else "")
    members = sorted(k for k in latest if k.startswith(("val_loss/", "val_loss_mixture/")))
    if not members:
        return ""
    parts = [("all", "the whole validation split", None, latest.get("val_loss"), latest.get("val_ppl"))]
    for name in members:
        family, _, member = name.partition("/")
        ppl = latest.get(f"{family.replace('loss', 'ppl')}/{member}")
        label = member + (" (mixture)" if family == "val_loss_mixture" else "")
        parts.append((label, name, None, latest[name], ppl))
    return (
        f"<p>Training's newest validation, step {latest['step']:,}; <code>keel eval RUN_DIR</code> evaluates a "
        "checkpoint and counts the tokens of each part.</p>" + _loss_rows(parts)
    )


def _interval_svg(gap: float, low: float, high: float, top: float) -> str:
    """A gap and its interval drawn on a shared 0..top scale, like a row of a forest plot."""
    width, pad = 220, 6

    def x(v: float) -> float:
        return pad + (width - 2 * pad) * max(0.0, v) / top

    return (
        f'<svg class="ci" width="{width}" height="18" role="img" aria-label="gap {gap:.4g}, 95% interval '
        f'{low:.4g} to {high:.4g}"><line x1="{pad}" y1="9" x2="{width - pad}" y2="9" class="axis"/>'
        f'<line x1="{x(low):.1f}" y1="9" x2="{x(high):.1f}" y2="9" class="interval"/>'
        f'<circle cx="{x(gap):.1f}" cy="9" r="4" class="point"/></svg>'
    )


def audit_html(audit: AuditFile | None) -> str:
    """audit.json per axis: the gap with its interval, the groups that lie furthest apart, the pairs that differ."""
    if audit is None:
        return ""
    top = max((a.gap_ci95[1] for a in audit.axes), default=0.0) or 1.0
    rows = []
    for a in audit.axes:
        holds = [p for p in a.pairs if p.ci95[0] > 0 or p.ci95[1] < 0]
        pairs = (
            "; ".join(
                f"{html.escape(p.groups[0] if p.difference > 0 else p.groups[1])} over "
                f"{html.escape(p.groups[1] if p.difference > 0 else p.groups[0])} by {abs(p.difference):.3g} "
                f"[{p.ci95[0]:.3g}, {p.ci95[1]:.3g}]"
                for p in holds
            )
            or "none"
        )
        means = ", ".join(f"{html.escape(g)} {v:.4f}" for g, v in a.groups.items())
        rows.append(
            f"<tr><th>{html.escape(a.axis)}</th><td class='n'>{a.gap:.4g}</td>"
            f"<td class='n'>[{a.gap_ci95[0]:.3g}, {a.gap_ci95[1]:.3g}]</td>"
            f"<td>{_interval_svg(a.gap, *a.gap_ci95, top)}</td>"
            f"<td>{html.escape(a.highest)} / {html.escape(a.lowest)}</td><td class='n'>{a.templates}</td>"
            f"<td>{pairs}</td><td class='means'>{means}</td></tr>"
        )
    return (
        f"<p><code>keel audit</code> of the checkpoint of step {audit.step:,}, {html.escape(audit.time)}; templates "
        f"{html.escape(audit.templates_sha256[:12])}..., {audit.bootstrap:,} bootstrap resamples. A gap is the "
        "highest group's mean log-likelihood minus the lowest's (never negative); a pair whose 95% interval "
        "excludes zero is a preference that holds across the templates. Compare gaps only between audits with "
        "the same templates.</p><table class='results'><tr><th>axis</th><th>gap (nats/token)</th>"
        "<th>95% interval</th><th>0 to "
        f"{top:.3g}</th><th>highest / lowest</th><th>templates</th>"
        "<th>pairs whose interval excludes zero</th><th>group means</th></tr>" + "".join(rows) + "</table>"
    )
