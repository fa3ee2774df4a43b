"""`keel report RUN_DIR`: one self-contained HTML page of plots and incidents, from the run dir alone."""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

from keel.errors import KeelError
from keel.io import read_jsonl
from keel.observe.heartbeat import read_status
from keel.observe.status_view import recent_incidents
from keel.rundir import RunDir

# (title, metrics drawn as lines, y-axis label); a panel is left out when the run recorded none of its metrics.
PANELS = [
    ("Loss", ["loss", "val_loss"], "nats/token"),
    ("Learning rate", ["lr"], "lr"),
    ("Throughput", ["tokens_per_s"], "tokens/s"),
    ("Model FLOPs utilisation", ["mfu"], "fraction of peak"),
    ("Step time", ["step_time_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s", "checkpoint_s"], "s"),
    ("Memory", ["memory_rss_gb", "memory_cuda_peak_gb", "memory_cuda_allocated_gb", "memory_cuda_reserved_gb"], "GB"),
]


def _plot(title: str, names: list[str], unit: str, records: list[dict], events: list[dict], t0: float) -> str | None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    series = {n: [(r["time"] - t0, r[n]) for r in records if n in r] for n in names}
    series = {n: points for n, points in series.items() if points}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    for name, points in series.items():
        xs, ys = zip(*[(t / 60, v) for t, v in points], strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
    for event in events:
        ax.axvline((event["time"] - t0) / 60, color="tab:red", alpha=0.5, linestyle="--", linewidth=1)
        ax.text(
            (event["time"] - t0) / 60,
            ax.get_ylim()[1],
            f" {event['event']}",
            color="tab:red",
            fontsize=7,
            rotation=90,
            va="top",
        )
    ax.set_title(title)
    ax.set_xlabel("minutes since the run started")
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _summary(run_dir: Path, records: list[dict]) -> list[tuple[str, str]]:
    status = read_status(run_dir)
    rows = [
        ("state", str(status.get("state", "unknown"))),
        ("step", f"{status.get('step', 0)}/{status.get('total_steps', '?')}"),
    ]
    train = [r for r in records if "loss" in r]
    if train:
        rows.append(("last loss", f"{train[-1]['loss']:.4f}"))
        rows.append(("tokens seen", f"{int(train[-1].get('tokens_seen', 0)):,}"))
        rows.append(("median tokens/s", f"{statistics.median(r['tokens_per_s'] for r in train):,.0f}"))
        if any("mfu" in r for r in train):
            rows.append(("median MFU", f"{statistics.median(r['mfu'] for r in train if 'mfu' in r):.1%}"))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    if val:
        rows.append(("validation loss", f"{val[0]:.4f} first, {val[-1]:.4f} last, {min(val):.4f} best"))
    return rows


def plan_comparison(events: list[dict], records: list[dict]) -> list[tuple[str, str, str, str]]:
    """The run's `keel plan` estimate (its last `plan` event) beside what it measured: (figure, planned, measured,
    measured / planned); empty when the run recorded no plan."""
    plans = [e for e in events if e.get("event") == "plan"]
    train = [r for r in records if "step_time_s" in r]
    if not plans or not train:
        return []
    plan = plans[-1]
    rows = [("step time (s, median)", plan["step_time_s"], statistics.median(r["step_time_s"] for r in train))]
    rows.append(("tokens/s (median)", plan["tokens_per_s"], statistics.median(r["tokens_per_s"] for r in train)))
    cuda = [r["memory_cuda_peak_gb"] for r in records if "memory_cuda_peak_gb" in r]
    rss = [r["memory_rss_peak_gb"] for r in records if "memory_rss_peak_gb" in r]
    if cuda:  # torch's allocator counts tensors only: compare with the plan's tensors
        tensors = plan["peak_memory_gb"] - plan["memory_framework_gb"] - plan["memory_allocator_gb"]
        rows.append(("peak memory per rank, tensors (GB)", tensors, max(cuda)))
    elif rss:
        rows.append(("peak memory per rank, resident (GB)", plan["peak_memory_gb"], max(rss)))
    if "mfu" in plan and any("mfu" in r for r in train):
        rows.append(("MFU (median)", plan["mfu"], statistics.median(r["mfu"] for r in train if "mfu" in r)))
    return [(name, f"{plan:.4g}", f"{measured:.4g}", f"{measured / plan:.2f}") for name, plan, measured in rows]


def plans_source(events: list[dict]) -> str:
    """Where the last plan's MFU came from, and its layout, in words."""
    plan = [e for e in events if e.get("event") == "plan"][-1]
    return f"{plan['layout']} on {plan['device']}; MFU in compute {plan['mfu_compute']:.1%} ({plan['mfu_source']})"


def _goodput_plot(events: list[dict], t0: float) -> str | None:
    """The ledger over time (stacked, cumulative) and as it stands (one stacked bar)."""
    from keel.resilience.goodput import CATEGORIES, goodput_ratio

    records = [e for e in events if e.get("event") == "goodput"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (timeline, bar) = plt.subplots(1, 2, figsize=(11, 3.2), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    minutes = [(r["time"] - t0) / 60 for r in records]
    timeline.stackplot(minutes, *[[r.get(c, 0.0) / 60 for r in records] for c in CATEGORIES], labels=CATEGORIES)
    timeline.set_xlabel("minutes since the run started")
    timeline.set_ylabel("minutes, cumulative")
    timeline.set_title("Where the wall time went")
    timeline.legend(fontsize=7, loc="upper left")
    last, left = records[-1], 0.0
    for category in CATEGORIES:
        width = last.get(category, 0.0) / 60
        bar.barh([0], [width], left=left, label=category)
        left += width
    bar.set_yticks([])
    bar.set_xlabel("minutes")
    bar.set_title(f"goodput {goodput_ratio({c: last.get(c, 0.0) for c in CATEGORIES}):.1%}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.html (plots as embedded PNGs, incidents marked) and return its path."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    records = read_jsonl(run.metrics)
    if not records:
        raise KeelError(f"{run_dir}: no metrics.jsonl records to plot; is this a run dir that has trained?")
    events = read_jsonl(run.events)
    t0 = min([r["time"] for r in records] + [e["time"] for e in events])
    incidents = recent_incidents(run_dir, limit=len(events) or 1)
    groups = sorted({name for r in records for name in r if name.startswith("grad_norm/")})
    panels = [*PANELS, ("Gradient norm per parameter group", groups, "L2 norm")]
    images = [(title, _plot(title, names, unit, records, incidents, t0)) for title, names, unit in panels]
    images.append(("Goodput", _goodput_plot(events, t0)))
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _summary(run_dir, records)
    )
    plots = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{png}"></figure>' for t, png in images if png
    )
    compared = plan_comparison(events, records)
    plan_table = "".join(f"<tr>{''.join(f'<td>{html.escape(c)}</td>' for c in row)}</tr>" for row in compared)
    if plan_table:
        plan_table = (
            f"<h2>Plan against the run</h2><p>{html.escape(plans_source(events))}</p><table><tr><th>figure</th>"
            f"<th>planned</th><th>measured</th><th>measured / planned</th></tr>{plan_table}</table>"
        )
    event_rows = "".join(
        f"<tr><td>{(e['time'] - t0) / 60:.1f}</td><td>{html.escape(e['event'])}</td>"
        f"<td>{html.escape(json.dumps({k: v for k, v in e.items() if k not in ('time', 'event')}))}</td></tr>"
        for e in incidents
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Keel report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1600px;margin:1em auto}} figure{{display:inline-block;margin:4px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}</style></head>
<body><h1>Keel run {html.escape(run_dir.name)}</h1>
<table>{rows}</table>
{plan_table}
<h2>Plots</h2>{plots}
<h2>Incidents</h2><table><tr><th>minute</th><th>event</th><th>details</th></tr>{event_rows}</table>
</body></html>
"""
    out = run.report
    out.write_text(page, encoding="utf-8")
    return out
