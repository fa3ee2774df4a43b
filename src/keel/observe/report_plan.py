"""The report's 'planned vs measured' table: the planner's estimate, logged at a run's start, against what it did.

The estimate is the newest `plan` event of events.jsonl. Each of its numeric fields named after a metric
(`step_time_s`, `tokens_per_s`, `mfu`, `memory_rss_gb`, `memory_cuda_peak_gb`, `device_hours`, `energy_kwh`, ...)
is compared with the run's own records of that metric; its text fields (device, layout, assumptions) are shown
as they are.
"""

from __future__ import annotations

import html
import statistics
from typing import Any

from keel.observe.metrics import unit_of
from keel.observe.report_series import number

TOTALS = {"device_hours", "energy_kwh", "energy_estimated_kwh"}  # estimated for the whole run, recorded as they grow
OFF = 0.25  # a measurement further than this from the estimate (either way) is marked


def _measured(name: str, records: list[dict[str, Any]], total_steps: int | None) -> tuple[float, str] | None:
    """The run's figure to hold against an estimate of `name`, and how it was taken."""
    values = [(r["step"], number(r[name])) for r in records if number(r.get(name)) is not None]
    if not values:
        return None
    if name.startswith("memory_"):
        return max(v for _, v in values), "peak"
    if name in TOTALS:
        step, value = values[-1]
        if total_steps and 0 < step < total_steps:
            return value * total_steps / step, f"projected from step {step:,} to {total_steps:,}"
        return value, "at the end"
    return statistics.median(v for _, v in values), "median"


def plan_html(events: list[dict[str, Any]], records: list[dict[str, Any]], total_steps: int | None) -> str:
    """The table, or '' when the run logged no estimate."""
    plans = [e for e in events if e.get("event") == "plan"]
    if not plans:
        return ""
    plan = plans[-1]
    recorded = {name for r in records for name in r} - {"step", "time"}
    rows = []
    for name, estimate in plan.items():
        if number(estimate) is None or (unit_of(name) is None and name not in recorded):
            continue  # a number that is no metric: a count, a setting, the step it was logged at
        measured = _measured(name, records, total_steps)
        if measured is None or not estimate:
            shown, ratio, how = "not recorded", "", ""
        else:
            value, how = measured
            off = abs(value / estimate - 1) > OFF
            shown = f"{value:.4g}"
            ratio = f'<span class="{"bad" if off else ""}">{value / estimate:.2f}x</span>'
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(unit_of(name) or '')}</td>"
            f"<td class='n'>{estimate:.4g}</td><td class='n'>{shown}</td><td class='n'>{ratio}</td>"
            f"<td>{html.escape(how)}</td></tr>"
        )
    facts = "; ".join(
        f"{html.escape(k)}: {html.escape(v)}"
        for k, v in plan.items()
        if isinstance(v, str) and k not in ("event", "host")
    )
    return (
        f"<p>The planner's estimate logged at step {plan.get('step', 0):,}"
        + (f" ({facts})" if facts else "")
        + f". A measurement more than {OFF:.0%} off the estimate is marked.</p>"
        "<table class='results'><tr><th>metric</th><th>unit</th><th>estimate</th><th>measured</th>"
        "<th>measured / estimate</th><th>how measured</th></tr>" + "".join(rows) + "</table>"
    )
