"""The one metrics hub: every number is recorded once, by name and unit, and fanned out to sinks."""

from __future__ import annotations

import time
from typing import Protocol

from keel.callback import Callback, StepOutcome

# Every metric Keel records, with its unit; recording an unknown name is a bug, caught at once.
UNITS: dict[str, str] = {
    "loss": "nats/token",
    "val_loss": "nats/token",
    "val_ppl": "perplexity",
    "lr": "1",
    "grad_norm": "1",
    "tokens_per_s": "tokens/s",
    "tokens_per_s_rank": "tokens/s",
    "tokens_seen": "tokens",
    "step_time_s": "s",
    "mfu": "fraction",
    "memory_rss_gb": "GB",
    "memory_rss_peak_gb": "GB",
    "memory_cuda_peak_gb": "GB",
    "memory_cuda_allocated_gb": "GB",
    "memory_cuda_reserved_gb": "GB",
    "eta_s": "s",
    "data_wait_s": "s",
    "forward_s": "s",
    "backward_s": "s",
    "optimizer_s": "s",
    "eval_s": "s",
    "checkpoint_s": "s",
    "checkpoint_age_s": "s",
    "rank_slowdown": "ratio",
    "straggler_slowdown": "ratio",
    "stragglers": "ranks",
    "goodput_ratio": "fraction",
    "power_w": "W",
    "energy_kwh": "kWh",
    "energy_estimated_kwh": "kWh",
    "device_hours": "h",
}

# Families of metrics named `<family>/<member>`, whose members are known only at run time: parameter groups,
# the dataset's sources (validation per source), data.mixture datasets, the bias audit's axes.
FAMILIES: dict[str, str] = {
    "grad_norm": "1",
    "val_loss": "nats/token",
    "val_ppl": "perplexity",
    "val_loss_mixture": "nats/token",
    "val_ppl_mixture": "perplexity",
    "audit_gap": "nats/token",
}


def unit_of(name: str) -> str | None:
    """The unit of a metric name, a family member's included; None for a name Keel does not know."""
    family, _, member = name.partition("/")
    return FAMILIES.get(family) if member else UNITS.get(name)


class Sink(Protocol):
    """A destination for metrics: console, JSON Lines, TensorBoard, ..."""

    def write(self, step: int, time: float, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class Metrics(Callback):
    """Collects a step's numbers and hands them to every sink; the training loop never calls a sink.

    As a callback it records what the capabilities before it added to a step, before the step is checkpointed:
    a checkpoint never holds a step whose metrics are not written.
    """

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])

    def record(self, step: int, values: dict[str, float]) -> None:
        """Record named values for `step` in every sink."""
        unknown = [name for name in values if unit_of(name) is None]
        if unknown:
            raise KeyError(f"unknown metric(s) {sorted(unknown)}; add them to keel.observe.metrics.UNITS or FAMILIES")
        now = time.time()
        clean = {k: float(v) for k, v in values.items()}
        for sink in self.sinks:
            sink.write(step, now, clean)

    def after_step(self, outcome: StepOutcome) -> None:
        if outcome.values and not outcome.discarded:
            self.record(outcome.step, outcome.values)

    def rewind(self, step: int) -> int:
        """Move records after `step` aside in every sink that keeps them (a resume or a rollback); how many."""
        return sum(sink.rewind(step) for sink in self.sinks if hasattr(sink, "rewind"))

    def close(self) -> None:
        """Flush and close every sink."""
        for sink in self.sinks:
            sink.close()
