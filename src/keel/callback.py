"""How a capability plugs into the training loop: a Callback with optional hooks, each deciding its own timing.

The loop calls every registered callback's hook in registration order:

  on_train_start(step)                      once, before the first step (step = where training resumes)
  before_step(step)                         before the step's data is read
  before_optimizer_step(step, loss, norm)   gradients are final; return False to veto the update (every rank
                                            must return the same: a callback that decides per rank agrees first)
  after_step(outcome)                       the step is done; add metrics to outcome.values, ask the loop to stop
  on_checkpoint(step, path)                 a checkpoint of `step` was written (committed, or in flight if async)
  on_error(error)                           the loop raised; the exception propagates afterwards
  on_exit(state)                            the loop ended: "finished", "stopped", "preempted", ...

A capability receives what it needs (model, checkpointer, event log, ...) when it is built, not through the
hooks, so it can be tested without a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoopControl:
    """What callbacks may ask of the loop: stop after this step (a checkpoint of it is saved first)."""

    stop_reason: str | None = None
    exit_state: str = "stopped"

    def request_stop(self, reason: str, exit_state: str = "stopped") -> None:
        """End training after the current step; the first request's reason and exit state win."""
        if self.stop_reason is None:
            self.stop_reason, self.exit_state = reason, exit_state

    @property
    def stopping(self) -> bool:
        """True once a stop has been requested."""
        return self.stop_reason is not None


@dataclass
class StepOutcome:
    """What one optimizer step did, handed to every after_step hook in turn."""

    step: int
    loss: Any  # this rank's mean loss over the step's micro batches (a 0-d tensor; reading it syncs the device)
    grad_norm: float  # the global gradient norm before clipping
    updated: bool  # False when a callback vetoed the optimizer update
    step_time_s: float  # wall time of the step itself (data wait, forward, backward, optimizer)
    data_wait_s: float  # the part of it spent waiting for the batch
    last: bool  # the step is train.steps
    discarded: bool = False  # a rollback undid the step: later callbacks neither record nor save it
    values: dict[str, float] = field(default_factory=dict)  # metrics to record for this step; callbacks add to it


class Callback:
    """Base class of a loop capability; override only the hooks it needs."""

    def on_train_start(self, step: int) -> None:
        """Training starts (or resumes) after `step`."""

    def before_step(self, step: int) -> None:
        """Step `step` is about to read its batch."""

    def before_optimizer_step(self, step: int, loss: Any, grad_norm: float) -> bool:
        """Gradients of `step` are final; return False to skip the update (all ranks must agree)."""
        return True

    def after_step(self, outcome: StepOutcome) -> None:
        """Step `outcome.step` is done."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A checkpoint of `step` was written to `path`."""

    def on_error(self, error: BaseException) -> None:
        """The loop raised `error` (it propagates after every callback has seen it)."""

    def on_exit(self, state: str) -> None:
        """The loop ended in `state`."""
