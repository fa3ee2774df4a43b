"""The training loop: a short loop over steps; every capability plugs in as a callback (keel.callback)."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch

from keel.callback import LoopControl, StepOutcome
from keel.checkpoint.checkpointer import Checkpointer
from keel.checkpoint.commit import committed_steps
from keel.checkpoint.hf import load_hf_weights
from keel.checkpoint.state import ModelOptimizerState
from keel.config import Config
from keel.data.dataset import TokenDataset
from keel.data.loader import BatchLoader
from keel.data.mixture import open_mixture
from keel.data.prefetch import PrefetchLoader
from keel.distributed.env import DistEnv
from keel.distributed.grads import norm_value
from keel.distributed.mesh import make_mesh
from keel.distributed.parallel import parallelize
from keel.models import model_args
from keel.observe.events import EventLog
from keel.observe.metrics import Metrics
from keel.observe.sinks import build_sinks
from keel.observe.step_timer import StepTimer
from keel.rundir import RunDir
from keel.train.capabilities import build_callbacks
from keel.train.optim import build_optimizer, lr_at, set_lr
from keel.train.planning import process_rss
from keel.train.precision import resolve_precision
from keel.train.state import TrainState

log = logging.getLogger("keel")


class Trainer:
    """Builds the model, data, optimizer and capabilities from a resolved config, then steps them."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.started_rss = process_rss()  # before the model: what the plan calls the framework
        run = RunDir(cfg.run_dir)
        spec, args = model_args(cfg.model_section())
        torch.manual_seed(cfg.run.seed)
        self.mesh = make_mesh(cfg.parallel, env)
        with torch.device("meta"):  # no rank ever holds the whole model: it is sharded before it is allocated
            model = spec.build(args)
        # The runner steps the model however it is parallelised; its model holds this rank's parameters.
        self.runner = parallelize(model, spec, cfg, env, self.mesh, self.autocast)
        self.model = self.runner.model
        if cfg.checkpoint.init_from_hf and not committed_steps(run.checkpoints):
            # A fresh run starts from these weights; once a checkpoint is committed, resume loads that instead.
            load_hf_weights(self.model, spec, args, cfg.checkpoint.init_from_hf)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.precision = resolve_precision(cfg, env.device)
        self.dtype = self.precision.dtype  # read by autocast() on every forward, so set before the first
        log.info(f"precision: {self.precision.reason}")
        self.flops_per_token = spec.flops_per_token(args, cfg.train.seq_len)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.loader = self._build_loader()
        self.state = TrainState()
        self.events = EventLog(run.events, main=env.is_main)
        self.metrics = Metrics(build_sinks(cfg, run.root, env))
        ckpt = cfg.checkpoint
        self.checkpointer = Checkpointer(
            run.checkpoints, env, ckpt.keep, on_event=self.events, keep_every=ckpt.keep_every
        )
        self.checkpointer.register("model", ModelOptimizerState(self.model, self.optimizer))
        self.checkpointer.register("trainer", self.state)
        self.checkpointer.register("data", self.loader)
        self.timer = StepTimer(env.device)
        self.control = LoopControl()
        self.callbacks = build_callbacks(self)

    def _build_loader(self) -> BatchLoader | PrefetchLoader:
        cfg = self.cfg
        # A mixture trains on its datasets by weight; validation stays on data.dataset.
        train_data, weights = (
            open_mixture(cfg.data.mixture, "train")
            if cfg.data.mixture
            else (TokenDataset(cfg.data.dataset, "train"), None)
        )
        loader = BatchLoader(
            train_data,
            weights=weights,
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size or cfg.train.global_batch_size // self.mesh.dp_size,
            rank=self.mesh.dp_rank,
            world_size=self.mesh.dp_size,
            seed=cfg.run.seed,
            document_positions=cfg.data.document_positions,
            document_mask=cfg.data.document_mask,
        )
        if cfg.data.num_workers:
            return PrefetchLoader(loader, cfg.data.num_workers, cfg.data.prefetch_factor)
        return loader

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the compute dtype is bf16; nothing otherwise."""
        enabled = self.dtype == torch.bfloat16
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=enabled)

    def call(self, hook: str, *args: Any) -> list[Any]:
        """Call `hook` on every callback, in order, and return their answers (every callback is called)."""
        return [getattr(callback, hook)(*args) for callback in self.callbacks]

    def restore(self) -> None:
        """Continue from the newest committed checkpoint, if there is one."""
        restored = self.checkpointer.restore_latest()
        if restored is None and not RunDir(self.cfg.run_dir).metrics.exists():
            return  # nothing was trained here yet: a fresh start
        step = restored[1] if restored else 0
        # Records of the attempt that died after its last checkpoint (all of them, if it never saved) move aside.
        keep_up_to = step if restored else -1
        dropped = self.metrics.rewind(keep_up_to)
        self.events("resume", step=step, world_size=self.env.world_size, metrics_rolled_back=dropped)
        log.info(f"resumed from {restored[0]} (step {step})" if restored else "no committed checkpoint: from step 0")

    def fit(self) -> str:
        """Train until `train.steps`, or until a callback asks to stop; returns how it ended (finished, ...)."""
        total = self.cfg.train.steps
        self.call("on_train_start", self.state.step)
        try:
            while self.state.step < total:  # a rollback may set the step back
                step = self.state.step + 1
                self.call("before_step", step)
                outcome = self.train_step(step)
                self.call("after_step", outcome)
                if self.control.stopping:
                    break
        except BaseException as e:
            self.call("on_error", e)
            raise
        state = "finished" if self.state.step == total else self.control.exit_state
        self.call("on_exit", state)
        return state

    def train_step(self, step: int) -> StepOutcome:
        """One optimizer step over a global batch: accumulate micro-batches, let the callbacks agree, clip, update."""
        started = time.perf_counter()
        set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.train.steps))
        with self.timer.phase("data_wait"):
            micro_batches = self.loader.next_batch()
        data_wait = time.perf_counter() - started
        loss_sum = torch.zeros((), device=self.env.device)
        count = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            loss_sum += self.runner.forward_backward(batch, count, i == count - 1, self.timer.phase)
        loss = loss_sum / count
        with self.timer.phase("optimizer"):
            norm = self.runner.grad_norm()
            value = norm_value(norm)
            updated = all(self.call("before_optimizer_step", step, loss, value))
            if updated:
                self.runner.clip(self.cfg.train.grad_clip, norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.state.tokens_seen += self.tokens_per_step
        elapsed = time.perf_counter() - started
        return StepOutcome(step, loss, value, updated, elapsed, data_wait, last=step == self.cfg.train.steps)
