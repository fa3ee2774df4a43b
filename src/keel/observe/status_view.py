"""`keel status RUN_DIR`: running, stalled, finished, stopped or crashed, with the recent incidents."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from keel.io import read_jsonl
from keel.observe.heartbeat import read_status
from keel.observe.sinks import format_metrics
from keel.rundir import RunDir
from keel.units import duration

# Events that are routine progress or an evaluation (keel eval, keel audit), not incidents worth an operator's eye.
ROUTINE_EVENTS = {"checkpoint", "goodput", "eval", "audit"}


def run_state(status: dict[str, Any], stall_timeout_s: float, now: float | None = None) -> str:
    """The state to show: a running (or starting) run whose heartbeat is older than the timeout is stalled."""
    state = status.get("state", "unknown")
    age = (now or time.time()) - status.get("updated_at", 0)
    if state in ("running", "starting") and age > stall_timeout_s:
        return "stalled"
    return state


def recent_incidents(run_dir: Path, limit: int = 5) -> list[dict[str, Any]]:
    """The last `limit` non-routine events of a run."""
    events = read_jsonl(RunDir(run_dir).events)
    return [e for e in events if e.get("event") not in ROUTINE_EVENTS][-limit:]


def describe_run(run_dir: Path, stall_timeout_s: float) -> str:
    """A few lines an operator reads to know how a run is doing."""
    run_dir = Path(run_dir)
    RunDir(run_dir).require()
    status = read_status(run_dir)
    if not status:
        return f"{run_dir}: no heartbeat yet (status.json missing); the run has not started training"
    now = time.time()
    state = run_state(status, stall_timeout_s, now)
    lines = [f"{run_dir}: {state.upper()} at step {status.get('step', 0)}/{status.get('total_steps', '?')}"]
    details = format_metrics(status, ("loss", "val_loss", "tokens_per_s"))
    if state == "running" and "eta_s" in status:
        details.append(f"ETA {status['eta_s'] / 60:.1f} min")
    if details:
        lines.append("  " + " | ".join(details))
    checkpoint = status.get("last_checkpoint_step")
    lines.append(f"  last checkpoint: {'none' if checkpoint is None else f'step {checkpoint}'}")
    lines.append(f"  heartbeat: {duration(now - status.get('updated_at', now))} ago from {status.get('host', '?')}")
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    ledger = [e for e in read_jsonl(RunDir(run_dir).events) if e.get("event") == "goodput"]
    if ledger:
        lost = ledger[-1].get("lost", 0.0) + ledger[-1].get("startup", 0.0)
        lines.append(
            f"  goodput: {ledger[-1]['ratio']:.1%} at step {ledger[-1]['step']} ({lost:,.0f} s lost to restarts, "
            "start-up and recomputation; `keel goodput` for the table)"
        )
    incidents = recent_incidents(run_dir)
    if incidents:
        lines.append("  recent events:")
        for e in incidents:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
            fields = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("time", "event", "host"))
            lines.append(f"    {when} {e['event']}" + (f" ({fields})" if fields else ""))
    return "\n".join(lines)
