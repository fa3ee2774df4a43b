"""`keel report RUN_DIR`: the run's front page, one self-contained HTML file drawn from the run dir alone.

A header with the run's state, progress, loss, goodput, energy and cost and links to its cards; plots of every
metric against step, tokens or wall time (inline SVG drawn by a small script of Keel's own, so the page works
offline); the incidents as a timeline of sentences; validation per source; the bias audit; the planner's estimate
against the measured figures.
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from keel.config_toml import read_toml
from keel.errors import KeelError
from keel.io import atomic_write_text, read_jsonl
from keel.observe.report_plan import plan_html
from keel.observe.report_results import AuditFile, EvalFile, audit_html, evaluation_html, read_results
from keel.observe.report_series import plot_data
from keel.observe.report_summary import header
from keel.observe.report_timeline import Incident, timeline
from keel.rundir import RunDir
from keel.units import duration

# (id, heading, what it holds) in page order; a section without plots or tables is left out.
SECTIONS = (
    ("training", "Training", ""),
    ("incidents", "Incidents", ""),
    (
        "validation",
        "Validation",
        "Held-out loss and perplexity, overall, per source of the dataset and per mixture dataset.",
    ),
    ("audit", "Bias audit", ""),
    ("speed", "Speed and goodput", ""),
    ("resources", "Memory, power and energy", ""),
    ("plan", "Planned against measured", ""),
    ("other", "Other metrics", ""),
)
REPEATS_SHOWN = 3  # a run of more same-kind incidents in a row folds the rest away
NOT_MARKED = {"inject", "finish"}  # incidents the plots do not mark (a test's own fault; the end of the run)
FEW = 10  # a kind of incident seen more often (stragglers at every check) is marked by a tick, not a line


def _asset(name: str) -> str:
    return resources.files("keel.observe").joinpath("report_assets", name).read_text(encoding="utf-8")


def _timeline_html(incidents: list[Incident], t0: float) -> str:
    if not incidents:
        return "<p>No incidents: nothing failed, hung, rolled back or was preempted.</p>"

    def item(i: Incident) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.time))
        step = "" if i.step is None else f"step {i.step:,}"
        return (
            f'<li class="{i.severity}"><span class="when">{when}</span><span class="since">+{duration(i.time - t0)}'
            f'</span><span class="step">{step}</span><span class="what">{html.escape(i.text)}</span></li>'
        )

    runs: list[list[Incident]] = []
    for i in incidents:
        if runs and runs[-1][0].kind == i.kind:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = []
    for run in runs:
        parts.append("".join(item(i) for i in run[:REPEATS_SHOWN]))
        if len(run) > REPEATS_SHOWN:
            rest = run[REPEATS_SHOWN:]
            parts.append(
                f'<li><details class="repeat"><summary>{len(rest)} more like it, until '
                f'{duration(rest[-1].time - t0)} after the start</summary><ol class="timeline">'
                + "".join(item(i) for i in rest)
                + "</ol></details></li>"
            )
    return f'<ol class="timeline">{"".join(parts)}</ol>'


def _figures(panels: list[dict[str, Any]], section: str) -> str:
    figures = [
        f'<figure class="panel" id="panel-{html.escape(p["id"])}"><figcaption>{html.escape(p["title"])}</figcaption>'
        f'<div class="chart"></div><ul class="legend"></ul></figure>'
        for p in panels
        if p["section"] == section
    ]
    return f'<div class="grid">{"".join(figures)}</div>' if figures else ""


def _config(run: RunDir) -> dict[str, Any]:
    """The run's resolved config as a table (any Keel version's), or {} for a directory without one."""
    return read_toml(run.config) if run.config.is_file() else {}


def render(run_dir: Path) -> str:
    """The report page of a run dir."""
    run = RunDir(run_dir)
    records = read_jsonl(run.metrics)
    if not records:
        raise KeelError(f"{run_dir}: no metrics.jsonl records to plot; is this a run dir that has trained?")
    config = _config(run)
    evaluation = read_results(run.eval_results, EvalFile, "keel eval")
    audit = read_results(run.audit_results, AuditFile, "keel audit")
    events = [e for e in read_jsonl(run.events) if isinstance(e.get("time"), (int, float))]
    undone = read_jsonl(run.metrics_rolled_back)
    t0 = min([r["time"] for r in records + undone] + [e["time"] for e in events])
    incidents = timeline(events, run.root)
    rows, panels = plot_data(records, undone, events, t0)
    often = Counter(i.kind for i in incidents)
    markers = [
        {
            "step": step,
            "tokens": rows.tokens_at(step),
            "time": round(i.time - t0, 3),
            "severity": i.severity,
            "text": i.text,
            "tick": often[i.kind] > FEW,
        }
        for i in incidents
        if i.kind not in NOT_MARKED and not (i.kind == "start" and not i.step)
        for step in [i.step if i.step is not None else rows.step_at(i.time)]
    ]
    latest = next((r for r in reversed(records) if "val_loss" in r), {})
    trained_sha = config.get("data", {}).get("manifest_sha256")
    tables = {
        "incidents": _timeline_html(incidents, t0),
        "validation": evaluation_html(evaluation, latest, trained_sha),
        "audit": audit_html(audit),
        "plan": plan_html(events, records, config.get("train", {}).get("steps")),
    }
    body, nav = [], []
    for key, heading, blurb in SECTIONS:
        content = _figures(panels, key) + tables.get(key, "")
        if not content:
            continue
        nav.append(f'<a href="#{key}">{heading}</a>')
        intro = f"<p>{html.escape(blurb)}</p>" if blurb else ""
        body.append(f'<section id="{key}"><h2>{heading}</h2>{intro}{content}</section>')
    data = {"axes": rows.axes(), "panels": panels, "markers": markers}
    # No "<" inside the script element, so no text in the data (a source name, a reason) can end or confuse it.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    made = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Keel run {html.escape(run.root.name)}</title>
<style>{_asset("report.css")}</style></head>
<body>
{header(run, config, records, events, incidents)}
<nav class="toolbar"><div>{" ".join(nav)}<span id="xaxis">x axis: </span></div></nav>
<main>
<noscript><p class="warn">The plots are drawn by the page's own script; allow JavaScript to see them.</p></noscript>
{"".join(body)}
</main>
<footer>Written by <code>keel report</code> at {html.escape(made)} from {html.escape(str(run.root.resolve()))}.
Dashed lines on the plots mark incidents (hover for the sentence; a short tick where one kind is frequent): red a
failure, amber a warning, grey a restart, resume or stop.</footer>
<script type="application/json" id="keel-data">{payload}</script>
<script>{_asset("report.js")}</script>
</body></html>
"""


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html and return its path."""
    run = RunDir(Path(run_dir))
    page = render(run.root)
    atomic_write_text(run.report, page)
    return run.report
