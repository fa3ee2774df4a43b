"""The report's header: the run's state and progress, loss, speed, goodput, energy and cost, links to its cards."""

from __future__ import annotations

import html
import os
import statistics
import time
from pathlib import Path
from typing import Any

from keel.checkpoint.commit import committed_steps
from keel.data.card import DATA_CARD
from keel.errors import KeelError
from keel.observe.heartbeat import read_status
from keel.observe.report_series import number
from keel.observe.report_timeline import Incident, counts
from keel.observe.status_view import run_state
from keel.resilience.goodput import CATEGORIES, goodput_ratio, ledger_of
from keel.rundir import RunDir
from keel.units import duration

ENERGY = ("energy_kwh", "energy_estimated_kwh", "device_hours")


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def model_line(config: dict[str, Any]) -> str:
    """'llama, 2 layers, dim 64, 0.17 M parameters; sequences of 32 tokens, 8 a step; fp32 precision'."""
    from keel.models import model_args

    model, train = _section(config, "model"), _section(config, "train")
    parts = [str(model.get("name", "?"))]
    if "n_layers" in model:
        parts.append(f"{model['n_layers']} layers, dim {model.get('dim', '?')}")
    try:
        spec, args = model_args(model)
        parts.append(f"{spec.num_params(args) / 1e6:,.2f} M parameters")
    except KeelError:
        pass  # a config from another Keel version: the count is left out, not guessed
    text = ", ".join(parts)
    if "seq_len" in train:
        text += f"; sequences of {train['seq_len']} tokens, {train.get('global_batch_size', '?')} a step"
    return text + (f"; {train['precision']} precision" if "precision" in train else "")


def finite(records: list[dict[str, Any]], name: str) -> list[tuple[int, float]]:
    """(step, value) of every record with a finite `name`, in order."""
    return [(r["step"], float(r[name])) for r in records if number(r.get(name)) is not None]


def _latest(records: list[dict[str, Any]], name: str) -> tuple[int, float] | None:
    values = finite(records, name)
    return values[-1] if values else None


def _energy(records: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, float]:
    """The largest energy totals the run recorded (they only grow, across restarts and rollbacks)."""
    sources = records + [e for e in events if e.get("event") == "energy"]
    return {n: max(r[n] for r in sources if n in r) for n in ENERGY if any(n in r for r in sources)}


def _power_source(events: list[dict[str, Any]]) -> str:
    newest: dict[Any, dict[str, Any]] = {e.get("rank", 0): e for e in events if e.get("event") == "power_source"}
    kinds = sorted({f"{e.get('method', '?')} on {e.get('device', '?')}" for e in newest.values()})
    estimate = any(e.get("estimate") for e in newest.values())
    return ("; " + ", ".join(kinds) + (" (an estimate from rated power)" if estimate else "")) if kinds else ""


def _tile(label: str, value: str, detail: str = "", extra: str = "") -> str:
    return (
        f'<div class="tile"><div class="label">{html.escape(label)}</div>'
        f'<div class="value">{html.escape(value)}</div>'
        f'<div class="detail">{html.escape(detail)}</div>{extra}</div>'
    )


def _goodput_tile(events: list[dict], records: list[dict], running: bool) -> str:
    ledger = ledger_of(events, records)
    if ledger is None:
        return ""  # no goodput record yet: a run writes one at every checkpoint and at its end
    totals = dict(ledger.totals)
    if ledger.final is None and not running:
        totals["lost"] += ledger.since_s  # work after the newest record of a run that is gone
    held = sum(totals.values()) - totals["idle"]
    bar = "".join(
        f'<span class="gp-{c}" style="width:{100 * totals[c] / held:.2f}%" title="{c}: {duration(totals[c])}"></span>'
        for c in CATEGORIES
        if c != "idle" and held > 0 and totals[c] > 0
    )
    legend = ", ".join(f"{c.replace('_', ' ')} {duration(totals[c])}" for c in CATEGORIES if totals[c] >= 0.5)
    return _tile("goodput", f"{goodput_ratio(totals):.1%}", legend, f'<div class="gpbar">{bar}</div>')


def _cost_tiles(config: dict[str, Any], records: list[dict], events: list[dict]) -> list[str]:
    energy = _energy(records, events)
    if not energy:
        return []
    observe = _section(config, "observe")
    tiles = []
    kwh, hours = energy.get("energy_kwh"), energy.get("device_hours")
    if kwh is not None:
        estimated = energy.get("energy_estimated_kwh", 0.0)
        note = "estimated" if estimated >= kwh > 0 else (f"{estimated:.3g} kWh estimated" if estimated else "measured")
        grid = observe.get("grid_gco2_per_kwh")
        grams = kwh * grid if isinstance(grid, (int, float)) else None
        co2 = "" if grams is None else f"; {grams:.3g} g" if grams < 1000 else f"; {grams / 1000:.3g} kg"
        co2 += f" CO2e at {grid:g} g/kWh" if co2 else ""
        tiles.append(_tile("energy", f"{kwh:.3g} kWh", f"{note}{co2}{_power_source(events)}"))
    if hours is not None:
        price = observe.get("price_per_device_hour")
        if isinstance(price, (int, float)):
            tiles.append(_tile("cost", f"{hours * price:,.2f} USD", f"{hours:.3g} device-hours x {price:g} USD"))
        else:
            tiles.append(_tile("device-hours", f"{hours:.3g} h", "no observe.price_per_device_hour in the config"))
    return tiles


def _links(run: RunDir, config: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, relative href) of the run's documents that exist."""
    links = [
        ("config", run.config),
        ("model card", run.model_card),
        ("evaluation", run.eval_results),
        ("bias audit", run.audit_results),
    ]
    data = _section(config, "data")
    datasets = [data.get("dataset")] + list((data.get("mixture") or {}).keys())
    for dataset in dict.fromkeys(d for d in datasets if isinstance(d, str) and d):
        links.append((f"data card ({Path(dataset).name})", Path(dataset) / DATA_CARD))
    return [(label, os.path.relpath(path, run.root)) for label, path in links if path.is_file()]


def header(
    run: RunDir, config: dict[str, Any], records: list[dict], events: list[dict], incidents: list[Incident]
) -> str:
    """The top of the page: what an operator needs to know first."""
    status = read_status(run.root)
    state = run_state(status, float(_section(config, "observe").get("stall_timeout_s", 600.0))) if status else "unknown"
    step = max(status.get("step", 0), records[-1]["step"])  # the heartbeat is rewritten every few seconds only
    total = status.get("total_steps", _section(config, "train").get("steps"))
    done = step / total if isinstance(total, int) and total > 0 else None
    times = [r["time"] for r in records] + [e["time"] for e in events if "time" in e]
    tokens = _latest(records, "tokens_seen")
    progress = f"step {step:,}" + (f" of {total:,} ({done:.0%})" if done is not None else "")
    detail = f"{int(tokens[1]):,} tokens seen" if tokens else ""
    if state == "running" and "eta_s" in status:
        detail += f"; about {duration(status['eta_s'])} to go"
    bar = f'<div class="progress"><span style="width:{100 * min(done, 1.0):.1f}%"></span></div>' if done else ""
    tiles = [_tile("progress", progress, detail, bar)]
    loss, val = _latest(records, "loss"), _latest(records, "val_loss")
    if loss:
        first = finite(records, "loss")[0]
        tiles.append(_tile("loss", f"{loss[1]:.4f}", f"at step {loss[0]:,}; {first[1]:.4f} at step {first[0]:,}"))
    if val:
        best = min(finite(records, "val_loss"), key=lambda p: p[1])
        tiles.append(
            _tile("validation loss", f"{val[1]:.4f}", f"at step {val[0]:,}; best {best[1]:.4f} at step {best[0]:,}")
        )
    speed = [v for _, v in finite(records, "tokens_per_s")]
    if speed:
        mfu = [v for _, v in finite(records, "mfu")]
        tiles.append(
            _tile(
                "throughput",
                f"{statistics.median(speed):,.0f} tokens/s",
                "median" + (f"; MFU {statistics.median(mfu):.1%} median" if mfu else ""),
            )
        )
    tiles.append(_goodput_tile(events, records, state == "running"))
    tiles += _cost_tiles(config, records, events)
    checkpoints = committed_steps(run.checkpoints)
    tiles.append(
        _tile(
            "wall time",
            duration(max(times) - min(times)),
            time.strftime("started %Y-%m-%d %H:%M %Z", time.localtime(min(times))),
        )
    )
    tiles.append(
        _tile(
            "last checkpoint",
            f"step {checkpoints[-1]:,}" if checkpoints else "none",
            f"{len(checkpoints)} committed" if checkpoints else "nothing to resume from yet",
        )
    )
    tiles.append(_tile("incidents", *counts(incidents)))
    why = status.get("error") or status.get("reason") or ""
    links = " ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in _links(run, config))
    beat = status.get("updated_at")
    seen = f"heartbeat {duration(time.time() - beat)} ago from {status.get('host', '?')}" if beat else "no heartbeat"
    return f"""<header>
<h1>{html.escape(run.root.name)} <span class="state state-{html.escape(state)}">{html.escape(state)}</span></h1>
<p class="sub">{html.escape(model_line(config))}</p>
<p class="sub">{html.escape(str(run.root.resolve()))}; {html.escape(seen)}</p>
{f'<p class="why">{html.escape(str(why))}</p>' if why else ""}
<div class="tiles">{"".join(t for t in tiles if t)}</div>
{f'<p class="links">{links}</p>' if links else ""}
</header>"""
