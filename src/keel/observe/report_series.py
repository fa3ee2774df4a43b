"""The report's plots as data: every metric series against step, tokens and wall time, thinned for the page."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def thin(values: np.ndarray, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most about `limit` values to draw: per bucket the lowest and the highest, so a spike survives;
    every gap (NaN) is kept."""
    n = len(values)
    if n <= limit:
        return np.arange(n)
    size = math.ceil(n / (limit // 2))
    grid = np.concatenate([values, np.full(-n % size, np.nan)]).reshape(-1, size)
    gaps = np.isnan(grid)
    start = np.arange(len(grid)) * size
    lowest = start + np.where(gaps, np.inf, grid).argmin(axis=1)
    highest = start + np.where(gaps, -np.inf, grid).argmax(axis=1)
    kept = np.concatenate([lowest, highest, np.flatnonzero(np.isnan(values)), [0, n - 1]])
    return np.unique(kept[kept < n])


def _floats(raw: list[Any]) -> np.ndarray:
    """The values as floats, anything not finite (a NaN loss, an inf, a value that is no number) as NaN: a gap."""
    try:
        values = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan if (x := number(v)) is None else x for v in raw], dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def columns(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[Any]]]:
    """Each metric's (record indices, values), in one pass over the records."""
    found: dict[str, tuple[list[int], list[Any]]] = {}
    for k, record in enumerate(records):
        for name, value in record.items():
            column = found.get(name)
            if column is None:
                column = found[name] = ([], [])
            column[0].append(k)
            column[1].append(value)
    return found


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
    name: str, column: tuple[list[int], list[Any]], rows: list[int], attempts: np.ndarray | None, style: str = "line"
) -> dict[str, Any]:
    """A metric's points; a line never joins two attempts of the run (a gap where one ended and the next began)."""
    index = np.asarray(column[0], dtype=np.int64)
    values = _floats(column[1])
    if attempts is not None and len(index) > 1:
        starts = np.flatnonzero(np.diff(attempts[index])) + 1  # the first point of each later attempt
        index, values = np.insert(index, starts, index[starts]), np.insert(values, starts, np.nan)
    kept = thin(values)
    return {
        "name": name,
        "i": [rows[k] for k in index[kept].tolist()],
        "y": [None if math.isnan(v) else float(f"{v:.6g}") for v in values[kept].tolist()],
        "style": style,
    }


def _panel_series(
    panel: Panel, kept: tuple[dict, list[int]], undone: tuple[dict, list[int]], attempts: np.ndarray
) -> list[dict[str, Any]]:
    found, rows = kept
    wanted = [n for n in panel.metrics if n in found]
    if panel.prefix:
        wanted += sorted(n for n in found if n.startswith(panel.prefix) and n not in wanted)
    if panel.family:
        members = sorted(n for n in found if n.startswith(f"{panel.family}/"))
        if not members:
            return []  # a family panel without members would repeat another panel's curve
        wanted += members
    series = [_series(n, found[n], rows, attempts) for n in wanted]
    if panel.id == "loss" and "loss" in undone[0]:  # steps a restart or rollback undid: what the run did before
        series.append(_series("loss (undone)", undone[0]["loss"], undone[1], None, style="undone"))
    return series


def _goodput_series(rows: Rows, ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    # Which attempt wrote each record: the first began with the run (its step-0 validation comes before its
    # start event), each later one with its start event.
    starts = sorted(e["time"] for e in events if e.get("event") == "start")[1:]
    attempts = np.searchsorted(starts, [r["time"] for r in records], side="right")
    rows = Rows(records + undone, t0)
    kept = [rows.add(r["step"], r["time"], r.get("tokens_seen")) for r in records]
    lost = [rows.add(r["step"], r["time"], r.get("tokens_seen")) for r in undone]
    found, redone = columns(records), columns(undone)
    for name in ("step", "time"):
        found.pop(name, None)
    panels: list[dict[str, Any]] = []
    placed: set[str] = set()

    def add(key: str, section: str, title: str, unit: str, series: list[dict], log: bool = False, **extra) -> None:
        panels.append(
            {"id": key, "section": section, "title": title, "unit": unit, "log": log, "series": series, **extra}
        )
        placed.update(s["name"] for s in series)

    for panel in PANELS:
        series = _panel_series(panel, (found, kept), (redone, lost), attempts)
        if series:
            add(panel.id, panel.section, panel.title, panel.unit, series, panel.log)
        if panel.id == "goodput_ratio" and ledger:
            add(
                "goodput",
                "speed",
                "Where the wall time went",
                "s, cumulative",
                _goodput_series(rows, ledger),
                stacked=True,
            )
    for k, name in enumerate(sorted(found)):  # whatever no panel above draws still gets a plot of its own
        if name not in placed and name not in AXIS_METRICS:
            # an HTML id: a metric's name may hold any character
            add(f"metric-{k}", "other", name, unit_of(name) or "", [_series(name, found[name], kept, attempts)])
    return rows, panels
