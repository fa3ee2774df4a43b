"""The report's incident timeline: each event of events.jsonl as a sentence an operator reads, with its severity."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keel.observe.status_view import ROUTINE_EVENTS

# Facts the report shows elsewhere (the header's energy tile, the plan table), not incidents.
FACTS = {"power_source", "energy", "plan"}
FAILURES = {"worker_failed", "hang", "checkpoint_corrupt"}
WARNINGS = {"rollback", "loss_spike", "nonfinite", "straggler"}
# (event, noun, plural) counted in the summary line, in this order.
COUNTED = (
    ("worker_failed", "worker failure", "worker failures"),
    ("restart", "restart", "restarts"),
    ("relaunch", "relaunch", "relaunches"),
    ("hang", "hang", "hangs"),
    ("preemption", "preemption", "preemptions"),
    ("rollback", "rollback", "rollbacks"),
    ("nonfinite", "non-finite step", "non-finite steps"),
    ("straggler", "straggler report", "straggler reports"),
    ("checkpoint_corrupt", "corrupt checkpoint", "corrupt checkpoints"),
)


@dataclass(frozen=True)
class Incident:
    """One line of the timeline."""

    time: float
    step: int | None
    kind: str  # the event, or "preemption" for a stop a signal asked for
    severity: str  # failure, warning, info or test
    text: str


def _log(path: Any, run_dir: Path) -> str:
    """A log path as the run dir's own relative path when it is inside it."""
    try:
        return str(Path(path).relative_to(run_dir))
    except ValueError:
        return str(path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith(('s', 'ch')) else 's'}"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def _sentence(e: dict[str, Any], run_dir: Path) -> tuple[str, str]:
    """(kind, sentence) for one event; an unknown event is told by its fields."""
    kind, step = e["event"], e.get("step")
    if kind == "start":
        where = f"{_plural(e.get('world_size', 1), 'process')} ({e.get('device', '?')})"
        return kind, f"Training started on {where}." if not step else f"Training continued at step {step} on {where}."
    if kind == "resume":
        undone = e.get("metrics_rolled_back") or 0
        extra = f"; {_plural(undone, 'logged step')} after it had to be redone" if undone else ""
        return kind, f"Resumed from the checkpoint of step {step}{extra}."
    if kind == "restart":
        return (
            kind,
            f"The workers were restarted (attempt {e.get('attempt', '?')}, {e.get('world_size', '?')} processes).",
        )
    if kind == "relaunch":
        return kind, (
            f"keel train launched the run again after {_plural(e.get('after_failures', 0), 'failure')}, "
            f"from the checkpoint of step {e.get('checkpoint_step')}."
        )
    if kind == "worker_failed":
        return kind, (
            f"Rank {e.get('rank', '?')} died ({e.get('exit', 'unknown exit')}) at step {step}"
            f"{', in ' + e['phase'] if e.get('phase') else ''}; its log: {_log(e.get('log', '?'), run_dir)}."
        )
    if kind == "hang":
        frozen = e.get("frozen_ranks") or []
        return kind, (
            f"Rank {e.get('rank', '?')} hung in {e.get('phase', '?')} at step {step} for "
            f"{e.get('stuck_s', '?')} s"
            + (f"; frozen ranks {frozen}" if frozen else "")
            + f"; every thread's stack is in {_log(e.get('log', '?'), run_dir)}."
        )
    if kind == "nonfinite":
        return kind, (
            f"Step {step}: non-finite loss or gradient (gradient norm {e.get('grad_norm')}), "
            f"{e.get('streak', 1)} in a row; no rank applied the update."
        )
    if kind == "loss_spike":
        return (
            kind,
            f"Step {step}: loss spiked to {_num(e.get('loss'))}, against a running median of {_num(e.get('median'))}.",
        )
    if kind == "rollback":
        skipped = e.get("skipped_batches") or []
        return kind, (
            f"Rolled back from step {step} to the checkpoint of step {e.get('to_step')} ({e.get('reason')}); "
            f"{_plural(len(skipped), 'batch')} will be skipped"
            + (f" ({skipped[0]}-{skipped[-1]})" if skipped else "")
            + f"; rollback {e.get('rollback', '?')} of this run."
        )
    if kind == "checkpoint_corrupt":
        return kind, (
            f"The checkpoint of step {step} failed verification ({e.get('error')}); the one before it was used."
        )
    if kind == "straggler":
        return kind, (
            f"Step {step}: rank {e.get('rank', '?')} on {e.get('rank_host', '?')} ran "
            f"{_num(e.get('slowdown'))}x the median ({e.get('cause', 'cause unknown')})."
        )
    if kind == "inject":
        return kind, f"Test fault injected: {e.get('kind')} on rank {e.get('rank', 0)} at step {step}."
    if kind == "stop":
        reason = str(e.get("reason") or "no reason given")
        if reason.startswith("preempted"):
            signal = reason.removeprefix("preempted").strip(" ()") or "a signal"
            return "preemption", f"Preempted by {signal} at step {step}; a checkpoint of the step was committed."
        return kind, f"Stopped at step {step}: {reason}."
    if kind == "finish":
        return kind, f"Finished at step {step}, {int(e.get('tokens_seen', 0)):,} tokens seen."
    fields = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("time", "event", "host"))
    return kind, f"{kind.replace('_', ' ').capitalize()}" + (f": {fields}." if fields else ".")


def _severity(kind: str) -> str:
    if kind in FAILURES:
        return "failure"
    if kind in WARNINGS or kind == "preemption":
        return "warning"
    return "test" if kind == "inject" else "info"


def timeline(events: list[dict[str, Any]], run_dir: Path) -> list[Incident]:
    """Every event an operator should know of, oldest first, as sentences."""
    incidents: list[Incident] = []
    for e in events:
        if e.get("event") in ROUTINE_EVENTS | FACTS or "time" not in e:
            continue
        if (
            e["event"] == "start"
            and incidents
            and incidents[-1].kind == "resume"
            and incidents[-1].step == e.get("step")
        ):
            continue  # the resume just said it
        kind, text = _sentence(e, run_dir)
        step = e.get("step")
        incidents.append(Incident(e["time"], step if isinstance(step, int) else None, kind, _severity(kind), text))
    return incidents


def counts(incidents: list[Incident]) -> tuple[str, str]:
    """('1 failure, 3 warnings', '1 restart, 2 rollbacks, ...') for the header; 'none' when nothing went wrong."""
    severity = Counter(i.severity for i in incidents)
    head = ", ".join(_plural(severity[s], s) for s in ("failure", "warning") if severity[s]) or "none"
    seen = Counter(i.kind for i in incidents)
    parts = [f"{seen[kind]} {one if seen[kind] == 1 else many}" for kind, one, many in COUNTED if seen[kind]]
    return head, ", ".join(parts) or "no restarts, rollbacks, hangs or preemptions"
