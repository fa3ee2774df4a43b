"""The training metrics of each logged step: loss over ranks, learning rate, throughput, MFU, time and memory."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from keel.callback import Callback, StepOutcome
from keel.distributed.env import DistEnv, all_reduce_mean
from keel.observe.step_timer import StepTimer


class ProgressRecorder(Callback):
    """Adds the progress metrics to every `every`-th step and the last; times the steps in between as one window."""

    def __init__(
        self,
        *,
        every: int,
        env: DistEnv,
        group_norms: Callable[[], dict[str, float]],
        optimizer: torch.optim.Optimizer,
        timer: StepTimer,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float | None,
        tokens_seen: Callable[[], int],
    ):
        self.every, self.env, self.group_norms, self.optimizer, self.timer = every, env, group_norms, optimizer, timer
        self.total_steps, self.tokens_per_step, self.tokens_seen = total_steps, tokens_per_step, tokens_seen
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._group_norms: dict[str, float] = {}
        self._window_start, self._window_steps = time.perf_counter(), 0
        self._last_save = time.perf_counter()  # a run that never saved is as exposed as one whose save is old

    def due(self, step: int) -> bool:
        """Whether this step's metrics are recorded."""
        return step % self.every == 0 or step == self.total_steps

    def on_train_start(self, step: int) -> None:
        self._window_start, self._window_steps = time.perf_counter(), 0

    def before_optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: float) -> bool:
        if self.due(step):  # before clipping, like the global norm
            self._group_norms = self.group_norms()
        return True

    def after_step(self, outcome: StepOutcome) -> None:
        self._window_steps += 1
        if outcome.discarded or not self.due(outcome.step):
            return
        step_time = (time.perf_counter() - self._window_start) / self._window_steps
        tokens_per_s = self.tokens_per_step / step_time
        values = {
            "loss": float(all_reduce_mean(outcome.loss)),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": outcome.grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_rank": tokens_per_s / self.env.world_size,  # this rank's share, over its own step time
            "tokens_seen": self.tokens_seen(),
            "step_time_s": step_time,
            "eta_s": (self.total_steps - outcome.step) * step_time,
            "memory_rss_gb": psutil.Process().memory_info().rss / 1e9,
            "memory_rss_peak_gb": peak_rss_bytes() / 1e9,
            "checkpoint_age_s": time.perf_counter() - self._last_save,
            **self.timer.take(self._window_steps),
            **{f"grad_norm/{group}": norm for group, norm in self._group_norms.items()},
        }
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)
        if self.env.device.type == "cuda":
            values["memory_cuda_peak_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 1e9
            values["memory_cuda_allocated_gb"] = torch.cuda.memory_allocated(self.env.device) / 1e9
            values["memory_cuda_reserved_gb"] = torch.cuda.memory_reserved(self.env.device) / 1e9
        outcome.values.update(values)
        self._window_start, self._window_steps = time.perf_counter(), 0

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._last_save = time.perf_counter()


def peak_rss_bytes() -> int:
    """This process's largest resident set so far (the kernel's high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
