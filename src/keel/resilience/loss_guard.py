"""The loss guard: a non-finite loss or gradient never reaches the optimizer; a spike rolls back past its data.

Every step the ranks agree, in one all-reduce, on the mean loss and whether anything was non-finite. A
non-finite step skips its update on every rank. Repeated non-finite steps (`resilience.nonfinite_patience`)
or a loss above `spike_factor` times the running median of the last `spike_window` losses reload the newest
committed checkpoint (never one of a refused step) and move the sample order past every batch read since
it, so the data that led there is not seen again; the skipped batches are recorded in events.jsonl and in
the guard's checkpointed state. After `resilience.max_rollbacks` rollbacks, or on the first bad step with
nonfinite = "stop", the run stops with one line naming the step.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable

import torch
import torch.distributed as dist

from keel.callback import Callback, StepOutcome
from keel.checkpoint.checkpointer import Checkpointer
from keel.config import ResilienceConfig
from keel.distributed.env import DistEnv, collective_device
from keel.errors import KeelError
from keel.observe.events import EventLog
from keel.observe.step_timer import StepTimer

log = logging.getLogger("keel")

# Fixed shapes of the checkpointed state (DCP loads into templates of the saved shape).
MAX_SKIPS = 64  # skipped batch ranges kept
MAX_WINDOW = 1024  # running losses kept; resilience.spike_window may change between resumes up to this


class TrainingStopped(KeelError):
    """Training cannot go on by itself (a loss that stays bad, too many rollbacks); a restart would not help."""


class LossGuard(Callback):
    """Skips non-finite updates, rolls back past spikes, and stops when neither helps (see the module doc)."""

    def __init__(
        self,
        cfg: ResilienceConfig,
        env: DistEnv,
        events: EventLog,
        checkpointer: Checkpointer,
        loader: object,
        timer: StepTimer,
        global_batch_size: int,
        rewind_metrics: Callable[[int], int],
    ):
        self.cfg, self.env, self.events, self.checkpointer = cfg, env, events, checkpointer
        self.loader, self.timer, self.global_batch_size = loader, timer, global_batch_size
        self.rewind_metrics = rewind_metrics
        self.losses: list[float] = []  # the last spike_window finite losses, oldest first
        self.skipped: list[tuple[int, int]] = []  # [first, end) global batch positions a rollback skipped
        self.rollbacks = 0
        self._streak = 0
        self._rollback: str | None = None  # why this step must roll back

    def before_optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: float) -> bool:
        self.timer.mark("collective")
        mean, bad = self._agree(loss, grad_norm)
        if bad:
            return self._nonfinite(step, mean, grad_norm)
        self._streak = 0
        if self._is_spike(mean):
            median = statistics.median(self.losses)
            self._rollback = f"loss spike {mean:.4f} > {self.cfg.spike_factor} x running median {median:.4f}"
            self.events("loss_spike", step=step, loss=round(mean, 6), median=round(median, 6))
            return False
        self.losses = [*self.losses, mean][-self.cfg.spike_window :]
        return True

    def after_step(self, outcome: StepOutcome) -> None:
        if self._rollback is not None:
            reason, self._rollback = self._rollback, None
            self._roll_back(outcome, reason)

    def _agree(self, loss: torch.Tensor, grad_norm: float) -> tuple[float, bool]:
        """The mean loss over ranks and whether any rank's loss or the gradient norm is non-finite."""
        local = float(loss)
        values = torch.tensor([local if math.isfinite(local) else 0.0, 0.0 if math.isfinite(local) else 1.0])
        if self.env.distributed:
            values = values.to(collective_device())
            dist.all_reduce(values)
        mean, bad = float(values[0]) / self.env.world_size, float(values[1]) > 0
        return mean, bad or not math.isfinite(grad_norm)

    def _is_spike(self, loss: float) -> bool:
        full = len(self.losses) >= self.cfg.spike_window // 2  # too few losses make a noisy median
        return bool(self.cfg.spike_factor) and full and loss > self.cfg.spike_factor * statistics.median(self.losses)

    def _nonfinite(self, step: int, loss: float, grad_norm: float) -> bool:
        self._streak += 1
        self.events("nonfinite", step=step, grad_norm=str(grad_norm), streak=self._streak, action=self.cfg.nonfinite)
        log.warning(f"step {step}: non-finite loss or gradient norm ({grad_norm}); the update is skipped")
        if self.cfg.nonfinite == "stop":
            raise TrainingStopped(
                f"resilience.nonfinite = 'stop': non-finite loss or gradient norm at step {step}; lower optim.lr, "
                "set train.grad_clip, or let the guard skip and roll back (resilience.nonfinite = 'rollback')"
            )
        if self.cfg.nonfinite == "rollback" and self._streak >= self.cfg.nonfinite_patience:
            self._rollback = f"{self._streak} non-finite steps in a row"
        return False

    def _roll_back(self, outcome: StepOutcome, reason: str) -> None:
        step = outcome.step
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingStopped(
                f"step {step}: {reason}, after {self.rollbacks} rollbacks (resilience.max_rollbacks); the run does "
                "not recover by itself: lower optim.lr or raise train.grad_clip, then resume"
            )
        self.timer.mark("rollback")
        self.checkpointer.wait()
        resume_at = self.loader.state_dict()["next_batch"]  # past every batch read since the checkpoint
        rollbacks, skipped = self.rollbacks + 1, self.skipped
        restored = self.checkpointer.restore_latest()  # also restores this guard's own state
        if restored is None:
            raise TrainingStopped(
                f"step {step}: {reason}, and there is no checkpoint to roll back to; lower optim.lr or "
                "save earlier (checkpoint.every), then start again"
            )
        path, to_step = restored
        first = self.loader.state_dict()["next_batch"]
        self.loader.load_state_dict({"next_batch": resume_at})
        self.rollbacks, self.skipped = rollbacks, [*skipped, (first, resume_at)][-MAX_SKIPS:]
        self._streak = 0
        dropped = self.rewind_metrics(to_step)
        batch = self.global_batch_size
        self.events(
            "rollback",
            step=step,
            to_step=to_step,
            reason=reason,
            checkpoint=str(path),
            skipped_batches=[first, resume_at],
            skipped_samples=[first * batch, resume_at * batch],
            metrics_rolled_back=dropped,
            rollback=rollbacks,
        )
        log.warning(f"step {step}: {reason}; rolled back to step {to_step}, skipping batches {first}..{resume_at - 1}")
        outcome.discarded = True
        outcome.values.clear()

    def state_dict(self) -> dict[str, object]:
        """Running losses, rollbacks and skipped batch ranges as fixed-shape tensors (DCP loads into templates)."""
        losses = torch.full((MAX_WINDOW,), math.nan, dtype=torch.float64)
        losses[: len(self.losses)] = torch.tensor(self.losses, dtype=torch.float64)
        skipped = torch.full((MAX_SKIPS, 2), -1, dtype=torch.int64)
        if self.skipped:
            skipped[: len(self.skipped)] = torch.tensor(self.skipped, dtype=torch.int64)
        return {"losses": losses, "skipped": skipped, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from a checkpointed state."""
        self.losses = [v for v in state["losses"].tolist() if not math.isnan(v)][-self.cfg.spike_window :]
        self.skipped = [(a, b) for a, b in state["skipped"].tolist() if a >= 0]
        self.rollbacks = int(state["rollbacks"])
