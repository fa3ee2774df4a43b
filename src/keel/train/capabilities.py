"""The capabilities a run plugs into its loop, in the order their hooks are called."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from keel.callback import Callback, LoopControl, StepOutcome
from keel.checkpoint.schedule import CheckpointSchedule
from keel.eval.audit import Audit
from keel.eval.validation import Validation
from keel.observe.card import CardWriter
from keel.observe.energy import EnergyMeter
from keel.observe.lifecycle import RunLifecycle
from keel.observe.mfu import peak_flops
from keel.observe.power import power_source
from keel.observe.profiler import StepProfiler
from keel.observe.progress import ProgressRecorder
from keel.observe.straggler import StragglerWatch
from keel.plan.event import PlanEvent
from keel.resilience.goodput import GoodputLedger
from keel.resilience.inject import FaultInjector, parse_faults
from keel.resilience.loss_guard import LossGuard
from keel.resilience.preemption import Preemption
from keel.resilience.watchdog import HangWatchdog
from keel.rundir import RunDir
from keel.train.planning import worker_plan

if TYPE_CHECKING:
    from keel.train.trainer import Trainer


class StopAfter(Callback):
    """`train.stop_after`: end this invocation after that step, with a checkpoint, as a preemption would."""

    def __init__(self, step: int | None, control: LoopControl):
        self.step, self.control = step, control

    def after_step(self, outcome: StepOutcome) -> None:
        if self.step is not None and outcome.step >= self.step and not outcome.last:
            self.control.request_stop("train.stop_after")


def build_callbacks(t: Trainer) -> list[Callback]:
    """Every capability of the run, in hook order.

    The order is the contract: faults are injected first and the loss guard rolls back before anything
    records or saves the step it discards; metrics are measured before evaluation and checkpointing add their
    time, and written (the hub) before the step is checkpointed; stop requests (stop_after, preemption) come
    before the checkpoint schedule, which saves the step a stop ends on; the lifecycle comes after the last save is
    committed, and the model card, which reads everything the others wrote (the final energy and goodput events,
    the flushed metrics, the committed checkpoint), last.
    """
    cfg, env, run = t.cfg, t.env, RunDir(t.cfg.run_dir)
    guard = LossGuard(
        cfg.resilience,
        env,
        t.events,
        t.checkpointer,
        t.loader,
        t.timer,
        cfg.train.global_batch_size,
        rewind_metrics=t.metrics.rewind,
    )
    ledger = GoodputLedger(run, t.events, t.timer)
    t.checkpointer.register("loss_guard", guard, optional=True)
    t.checkpointer.register("goodput", ledger, optional=True)
    energy = EnergyMeter(power_source(env), env, t.events, run, cfg.observe.log_every, cfg.train.steps)
    t.checkpointer.register("energy", energy, optional=True)
    faults = parse_faults(cfg.resilience.inject, env.world_size)
    # Matmuls run in bf16 under bf16 autocast, and where FSDP2 gathers bf16 weights whatever train.precision says.
    bf16 = t.dtype == torch.bfloat16 or (cfg.parallel.fsdp_param_dtype == "bfloat16" and t.mesh.layout.fsdp)
    peak = peak_flops(env.device, torch.bfloat16 if bf16 else t.dtype)
    # The plan of this very run, from its own start-up memory and matmul ceiling, for `keel report` to compare with.
    plan = worker_plan(cfg, env, t.started_rss, peak, bf16) if env.is_main else None
    return [
        HangWatchdog(cfg.resilience.hang_timeout_s, env, t.events, run, t.timer),
        *([FaultInjector(faults, env.rank, t.runner.parts, t.events, t.checkpointer, t.timer)] if faults else []),
        StepProfiler(cfg.observe.profile_steps, run.root, env.rank, env.device),
        guard,
        ProgressRecorder(
            every=cfg.observe.log_every,
            env=env,
            group_norms=t.runner.grad_norms_by_group,
            optimizer=t.optimizer,
            timer=t.timer,
            total_steps=cfg.train.steps,
            tokens_per_step=t.tokens_per_step,
            flops_per_token=t.flops_per_token,
            peak_flops=peak,
            tokens_seen=lambda: t.state.tokens_seen,
        ),
        energy,
        StragglerWatch(cfg.observe.straggler_every, cfg.observe.straggler_margin, env, t.events, t.timer),
        Validation(t.runner.token_losses, cfg, env.device, t.mesh, t.timer, t.metrics.record),
        Audit(cfg, t.model, env, t.mesh, t.runner.forward_context, t.timer, t.metrics.record),
        StopAfter(cfg.train.stop_after, t.control),
        Preemption(env, t.control, t.timer),
        ledger,
        t.metrics,
        CheckpointSchedule(
            t.checkpointer,
            cfg.checkpoint.every,
            cfg.checkpoint.async_save,
            t.control,
            t.timer,
            saved=lambda step, path: t.call("on_checkpoint", step, path),
        ),
        RunLifecycle(
            run.root,
            env,
            t.events,
            t.metrics,
            t.control,
            progress=lambda: (t.state.step, t.state.tokens_seen),
            precision=t.precision.name,
        ),
        *([PlanEvent(plan, t.events)] if plan else []),  # after the start it belongs to
        CardWriter(run, env),
    ]
