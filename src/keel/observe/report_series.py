"""The report's plots as data: every metric series against step, tokens and wall time, thinned for the page."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from keel.observe.metrics import unit_of
from keel.resilience.goodput import CATEGORIES

MAX_POINTS = 1500  # per series: a page stays a few MB however long the run, and every spike stays visible
AXIS_METRICS = {"tokens_seen", "eta_s"}  # an axis and a forecast, not curves
# The goodput categories' colours, the same as the header's bar (report.css .gp-*).
GOODPUT_COLOURS = {
    "productive": "#2ca02c",
    "data_wait": "#bcbd22",
    "eval": "#17becf",
    "checkpoint": "#9467bd",
    "startup": "#ff7f0e",
    "lost": "#d62728",
    "idle": "#c7c7c7",
}


@dataclass(frozen=True)
class Panel:
    """One plot: the metrics drawn in it (or a `<family>/` of them), where it goes, how its y axis reads."""

    id: str
    section: str
    title: str
    unit: str
    metrics: tuple[str, ...] = ()
    family: str | None = None
    log: bool = False
    prefix: str | None = None  # and any other metric whose name starts with this


# In page order; a panel is left out when the run recorded none of its metrics.
PANELS = (
    Panel("loss", "training", "Loss", "nats/token", ("loss", "val_loss")),
    Panel("lr", "training", "Learning rate", "lr", ("lr",)),
    Panel("grad_norm", "training", "Gradient norm", "L2 norm", ("grad_norm",)),
    Panel("grad_groups", "training", "Gradient norm per parameter group", "L2 norm", family="grad_norm", log=True),
    Panel("val_sources", "validation", "Validation loss per source", "nats/token", ("val_loss",), "val_loss"),
    Panel(
        "val_ppl_sources",
        "validation",
        "Validation perplexity per source",
        "perplexity",
        ("val_ppl",),
        "val_ppl",
        log=True,
    ),
    Panel("val_mixture", "validation", "Validation loss per mixture dataset", "nats/token", family="val_loss_mixture"),
    Panel(
        "val_ppl_mixture",
        "validation",
        "Validation perplexity per mixture dataset",
        "perplexity",
        family="val_ppl_mixture",
        log=True,
    ),
    Panel("audit_gap", "audit", "Bias audit: log-likelihood gap per axis", "nats/token", family="audit_gap"),
    Panel("throughput", "speed", "Throughput", "tokens/s", ("tokens_per_s", "tokens_per_s_rank")),
    Panel("mfu", "speed", "Model FLOPs utilisation", "fraction of peak", ("mfu",)),
    Panel(
        "step_time",
        "speed",
        "Step time",
        "s",
        ("step_time_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s", "eval_s", "checkpoint_s"),
    ),
    Panel("goodput_ratio", "speed", "Goodput ratio", "fraction of wall time", ("goodput_ratio",)),
    Panel("stragglers", "speed", "Slowest rank against the median", "ratio", ("straggler_slowdown", "rank_slowdown")),
    Panel(
        "memory",
        "resources",
        "Memory",
        "GB",
        ("memory_rss_gb", "memory_cuda_peak_gb", "memory_cuda_allocated_gb", "memory_cuda_reserved_gb"),
        prefix="memory_",
    ),
    Panel("power", "resources", "Power", "W", ("power_w",)),
    Panel("energy", "resources", "Energy", "kWh", ("energy_kwh", "energy_estimated_kwh")),
    Panel("device_hours", "resources", "Device-hours", "h", ("device_hours",)),
    Panel("checkpoint_age", "resources", "Time since the last checkpoint", "s", ("checkpoint_age_s",)),
)


def number(value: Any) -> float | None:
    """A recorded value as a float, or None for a missing or non-finite one (a gap in the line)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else None


def clean(value: float | None) -> float | None:
    """A number as the page carries it: 6 significant digits keep it small."""
    return None if value is None else float(f"{value:.6g}")


def thin(points: list[tuple[int, float | None]], limit: int = MAX_POINTS) -> list[tuple[int, float | None]]:
    """At most about `limit` points: per bucket the lowest and the highest, so a spike survives; gaps all kept."""
    if len(points) <= limit:
        return points
    size = math.ceil(len(points) / (limit // 2))
    kept: set[int] = {0, len(points) - 1}
    for start in range(0, len(points), size):
        bucket = range(start, min(start + size, len(points)))
        finite = [k for k in bucket if points[k][1] is not None]
        kept.update(k for k in bucket if points[k][1] is None)
        if finite:
            kept.add(min(finite, key=lambda k: points[k][1]))
            kept.add(max(finite, key=lambda k: points[k][1]))
    return [points[k] for k in sorted(kept)]


class Rows:
    """The x values every point is drawn at: step, tokens seen and seconds since the run began."""

    def __init__(self, records: list[dict[str, Any]], t0: float):
        self.t0 = t0
        self.step: list[int] = []
        self.time: list[float] = []
        self._tokens: list[float | None] = []
        known = sorted((r["step"], r["tokens_seen"]) for r in records if "tokens_seen" in r and r.get("step"))
        self._per_step = known[-1][1] / known[-1][0] if known else None  # every step trains the same tokens
        self._exact = dict(known)
        self._times = sorted((r["time"], r["step"]) for r in records if "step" in r)

    def add(self, step: int, time: float, tokens: float | None = None) -> int:
        """A new row; its index."""
        self.step.append(step)
        self.time.append(round(time - self.t0, 3))
        self._tokens.append(tokens if tokens is not None else self.tokens_at(step))
        return len(self.step) - 1

    def tokens_at(self, step: int) -> float | None:
        """Tokens seen after `step`: as recorded, else step x the tokens every step trains."""
        if step in self._exact:
            return self._exact[step]
        return step * self._per_step if self._per_step is not None else None

    def step_at(self, time: float) -> int:
        """The newest recorded step at or before `time` (0 before any)."""
        k = bisect.bisect_right(self._times, (time, math.inf))
        return self._times[k - 1][1] if k else 0

    def axes(self) -> dict[str, list | None]:
        """The x axes for the page; tokens is None when the run never recorded them."""
        tokens = None if any(t is None for t in self._tokens) else [clean(number(t)) for t in self._tokens]
        return {"step": self.step, "tokens": tokens, "time": self.time}


def _series(
    name: str, rows: list[int], records: list[dict[str, Any]], attempts: list[int] | None = None, style: str = "line"
) -> dict[str, Any] | None:
    """A metric's points; a line never joins two attempts of the run (a gap where one ended and the next began)."""
    points: list[tuple[int, float | None]] = []
    last = None
    for k, (row, r) in enumerate(zip(rows, records, strict=True)):
        if name not in r:
            continue
        if attempts is not None and last is not None and attempts[k] != last:
            points.append((row, None))
        points.append((row, number(r[name])))
        last = attempts[k] if attempts is not None else None
    if not points:
        return None
    points = thin(points)
    return {"name": name, "i": [p[0] for p in points], "y": [clean(p[1]) for p in points], "style": style}


def _panel_series(
    panel: Panel,
    names: list[str],
    kept: tuple[list[int], list[dict]],
    undone: tuple[list[int], list[dict]],
    attempts: list[int],
) -> list[dict[str, Any]]:
    wanted = list(panel.metrics)
    if panel.prefix:
        wanted += [n for n in names if n.startswith(panel.prefix) and n not in wanted]
    if panel.family:
        wanted += [n for n in names if n.startswith(f"{panel.family}/")]
        if len(wanted) == len(panel.metrics):
            return []  # a family panel without members would repeat another panel's curve
    series = [s for s in (_series(n, *kept, attempts) for n in wanted) if s]
    if panel.id == "loss":  # steps a restart or rollback undid: what the run did before it went back
        lost = _series("loss", *undone, style="undone")
        if lost:
            series.append({**lost, "name": "loss (undone)"})
    return series


def _goodput_series(rows: Rows, ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not ledger:
        return []
    index = [rows.add(e.get("step", rows.step_at(e["time"])), e["time"]) for e in ledger]
    return [
        {
            "name": c,
            "i": index,
            "y": [clean(number(e.get(c, 0.0))) for e in ledger],
            "style": "area",
            "colour": GOODPUT_COLOURS[c],
        }
        for c in CATEGORIES
        if any(e.get(c) for e in ledger)
    ]


def plot_data(
    records: list[dict[str, Any]], undone: list[dict[str, Any]], events: list[dict[str, Any]], t0: float
) -> tuple[Rows, list[dict[str, Any]]]:
    """Rows and panels (each {id, section, title, unit, log, series}) for every metric the run recorded."""
    ledger = [e for e in events if e.get("event") == "goodput"]
    starts = sorted(e["time"] for e in events if e.get("event") == "start")
    attempts = [bisect.bisect_right(starts, r["time"]) for r in records]  # which attempt recorded each record
    rows = Rows(records + undone, t0)
    kept = [rows.add(r["step"], r["time"], r.get("tokens_seen")) for r in records]
    lost = [rows.add(r["step"], r["time"], r.get("tokens_seen")) for r in undone]
    names = sorted({n for r in records for n in r} - {"step", "time"})
    panels: list[dict[str, Any]] = []
    placed: set[str] = set()
    for panel in PANELS:
        series = _panel_series(panel, names, (kept, records), (lost, undone), attempts)
        if series:
            panels.append(
                {
                    "id": panel.id,
                    "section": panel.section,
                    "title": panel.title,
                    "unit": panel.unit,
                    "log": panel.log,
                    "series": series,
                }
            )
            placed.update(s["name"] for s in series)
        if panel.id == "goodput_ratio":
            goodput = _goodput_series(rows, ledger)
            if goodput:
                panels.append(
                    {
                        "id": "goodput",
                        "section": "speed",
                        "title": "Where the wall time went",
                        "unit": "s, cumulative",
                        "log": False,
                        "stacked": True,
                        "series": goodput,
                    }
                )
    for k, name in enumerate(names):  # whatever no panel above draws still gets a plot of its own
        if name not in placed and name not in AXIS_METRICS:
            series = _series(name, kept, records, attempts)
            if series:
                panels.append(
                    {
                        "id": f"metric-{k}",  # an HTML id: a metric's name may hold any character
                        "section": "other",
                        "title": name,
                        "unit": unit_of(name) or "",
                        "log": False,
                        "series": [series],
                    }
                )
    return rows, panels
