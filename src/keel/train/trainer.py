"""The training loop: a short, readable loop that calls capabilities through small interfaces."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import psutil
import torch

from keel.checkpoint.checkpointer import Checkpointer
from keel.checkpoint.commit import committed_steps
from keel.checkpoint.hf import load_hf_weights
from keel.checkpoint.state import ModelOptimizerState
from keel.config import Config
from keel.data.dataset import TokenDataset
from keel.data.loader import BatchLoader, eval_batches
from keel.data.mixture import open_mixture
from keel.data.prefetch import PrefetchLoader
from keel.distributed.env import DistEnv, all_reduce_mean
from keel.distributed.parallel import apply_data_parallel, clip_grad_norm, grad_norms_by_group, gradient_sync
from keel.eval.validation import validation_loss
from keel.models import model_args
from keel.models.loss import batch_loss
from keel.observe.events import EventLog
from keel.observe.heartbeat import mark_state
from keel.observe.metrics import Metrics
from keel.observe.mfu import peak_flops
from keel.observe.profiler import StepProfiler
from keel.observe.sinks import build_sinks, rewind_jsonl
from keel.observe.step_timer import StepTimer
from keel.observe.straggler import StragglerWatch
from keel.rundir import RunDir
from keel.train.optim import build_optimizer, lr_at, set_lr
from keel.train.state import TrainState

log = logging.getLogger("keel")


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: `train.precision`, where auto means bf16 on CUDA and fp32 on CPU."""
    if cfg.train.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


class Trainer:
    """Builds the model, data, optimizer and capabilities from a resolved config, then steps them."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        run = RunDir(cfg.run_dir)
        spec, args = model_args(cfg.model_section())
        torch.manual_seed(cfg.run.seed)
        with torch.device(env.device):
            model = spec.build(args)
        if cfg.checkpoint.init_from_hf and not committed_steps(run.checkpoints):
            # A fresh run starts from these weights; once a checkpoint is committed, resume loads that instead.
            load_hf_weights(model, spec, args, Path(cfg.checkpoint.init_from_hf))
        if cfg.train.compile:
            for unit in spec.shard_units(model):
                unit.compile()
        self.model = apply_data_parallel(model, cfg.parallel.dp, env, spec.shard_units)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.dtype = compute_dtype(cfg, env.device)
        self.flops_per_token = spec.flops_per_token(args, cfg.train.seq_len)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len

        # A mixture trains on its datasets by weight; validation stays on data.dataset.
        train_data, weights = (
            open_mixture(cfg.data.mixture, "train")
            if cfg.data.mixture
            else (TokenDataset(cfg.data.dataset, "train"), None)
        )
        self.loader: BatchLoader | PrefetchLoader = BatchLoader(
            train_data,
            weights=weights,
            seq_len=cfg.train.seq_len,
            global_batch_size=cfg.train.global_batch_size,
            micro_batch_size=cfg.train.micro_batch_size or cfg.train.global_batch_size // env.world_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.run.seed,
            document_positions=cfg.data.document_positions,
            document_mask=cfg.data.document_mask,
        )
        if cfg.data.num_workers:
            self.loader = PrefetchLoader(self.loader, cfg.data.num_workers, cfg.data.prefetch_factor)
        self.val_data = TokenDataset(cfg.data.dataset, "val")
        self.state = TrainState()
        self.events = EventLog(run.events if env.is_main else None)
        self.metrics = Metrics(build_sinks(cfg, run.root, env))
        ckpt = cfg.checkpoint
        self.checkpointer = Checkpointer(
            run.checkpoints, env, ckpt.keep, on_event=self.events, keep_every=ckpt.keep_every
        )
        self.checkpointer.register("model", ModelOptimizerState(self.model, self.optimizer))
        self.checkpointer.register("trainer", self.state)
        self.checkpointer.register("data", self.loader)
        self.peak_flops = peak_flops(env.device, self.dtype)
        self.timer = StepTimer(env.device)
        self.profiler = StepProfiler(cfg.observe.profile_steps, run.root, env.rank, env.device)
        self.stragglers = StragglerWatch(cfg.observe.straggler_every, cfg.observe.straggler_margin, env, self.events)
        self._group_norms: dict[str, float] = {}
        self._last_save = time.perf_counter()  # a run that never saved is as exposed as one whose save is old

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when the compute dtype is bf16; nothing otherwise."""
        enabled = self.dtype == torch.bfloat16
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=enabled)

    def restore(self) -> None:
        """Continue from the newest committed checkpoint, if there is one."""
        restored = self.checkpointer.restore_latest()
        if restored is None:
            log.info("no committed checkpoint yet: starting from step 0")
            return
        latest, step = restored
        dropped = rewind_jsonl(RunDir(self.cfg.run_dir).metrics, step) if self.env.is_main else 0
        self.events("resume", step=step, world_size=self.env.world_size, metrics_rolled_back=dropped)
        log.info(f"resumed from {latest} (step {step})")

    def fit(self) -> None:
        """Train until `train.steps` (or `train.stop_after`), evaluating and checkpointing on schedule."""
        cfg = self.cfg.train
        self.events("start", step=self.state.step, world_size=self.env.world_size, device=str(self.env.device))
        if cfg.eval_every and self.state.step == 0:
            self.metrics.record(0, {"val_loss": self.evaluate()})  # the untrained baseline every curve starts from
        window_start, window_steps = time.perf_counter(), 0
        for step in range(self.state.step + 1, cfg.steps + 1):
            self.profiler.before_step(step)
            loss, grad_norm = self.train_step(step)
            self.profiler.after_step(step)
            window_steps += 1
            values: dict[str, float] = {}
            if self._records(step):
                elapsed = time.perf_counter() - window_start
                values = self._progress(step, float(all_reduce_mean(loss)), grad_norm, elapsed, window_steps)
                window_start, window_steps = time.perf_counter(), 0
                if self.stragglers.due(step):
                    values.update(self.stragglers.check(step, values["step_time_s"], values["data_wait_s"]))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                with self.timer.phase("eval"):
                    values["val_loss"] = self.evaluate()
            if values:
                self.metrics.record(step, values)
            stopping = cfg.stop_after is not None and step >= cfg.stop_after
            every = self.cfg.checkpoint.every
            if (every and step % every == 0) or step == cfg.steps or stopping:
                with self.timer.phase("checkpoint"):
                    self._save(step)
                self._last_save = time.perf_counter()
            if stopping:
                self.events("stop", step=step, reason="train.stop_after")
                break
        self.checkpointer.wait()  # an asynchronous save counts only once committed: never exit before it is
        finished = self.state.step == cfg.steps
        if finished:
            self.events("finish", step=self.state.step, tokens_seen=self.state.tokens_seen)
        self.metrics.close()  # flushes the last heartbeat, which the final state below keeps
        if self.env.is_main:
            mark_state(self.cfg.run_dir, "finished" if finished else "stopped", step=self.state.step)

    def _records(self, step: int) -> bool:
        """Whether this step's metrics are recorded: every observe.log_every, the last step, a straggler check."""
        return step % self.cfg.observe.log_every == 0 or step == self.cfg.train.steps or self.stragglers.due(step)

    def _save(self, step: int) -> None:
        if self.cfg.checkpoint.async_save:
            self.checkpointer.save_async(step)
        else:
            self.checkpointer.save(step)

    def train_step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step over a global batch: accumulate micro-batches, clip, update."""
        set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.train.steps))
        with self.timer.phase("data_wait"):
            micro_batches = self.loader.next_batch()
        loss_sum = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(micro_batches):
            with gradient_sync(self.model, enabled=i == len(micro_batches) - 1):
                with self.timer.phase("forward"), self.autocast():
                    loss = batch_loss(self.model, batch, self.env.device)
                with self.timer.phase("backward"):
                    (loss / len(micro_batches)).backward()
            loss_sum += loss.detach()
        with self.timer.phase("optimizer"):
            if self._records(step):  # before clipping, like the global norm
                self._group_norms = grad_norms_by_group(self.model)
            grad_norm = clip_grad_norm(self.model, self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step
        self.state.tokens_seen += self.tokens_per_step
        return loss_sum / len(micro_batches), grad_norm

    def evaluate(self) -> float:
        """Validation loss averaged over all ranks."""
        batches = eval_batches(
            self.val_data,
            seq_len=self.cfg.train.seq_len,
            batch_size=self.cfg.train.global_batch_size,
            num_batches=self.cfg.train.eval_batches,
            rank=self.env.rank,
            world_size=self.env.world_size,
            document_positions=self.cfg.data.document_positions,
            document_mask=self.cfg.data.document_mask,
        )
        return float(all_reduce_mean(validation_loss(self.model, batches, self.env.device, self.autocast)))

    def _progress(self, step: int, loss: float, grad_norm: float, elapsed: float, steps: int) -> dict[str, float]:
        step_time = elapsed / steps
        tokens_per_s = self.tokens_per_step / step_time
        values = {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_rank": tokens_per_s / self.env.world_size,  # this rank's share, over its own step time
            "tokens_seen": self.state.tokens_seen,
            "step_time_s": step_time,
            "eta_s": (self.cfg.train.steps - step) * step_time,
            "memory_rss_gb": psutil.Process().memory_info().rss / 1e9,
            "checkpoint_age_s": time.perf_counter() - self._last_save,
            **self.timer.take(steps),
            **{f"grad_norm/{group}": norm for group, norm in self._group_norms.items()},
        }
        if self.peak_flops:
            values["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)
        if self.env.device.type == "cuda":
            values["memory_cuda_peak_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 1e9
            values["memory_cuda_allocated_gb"] = torch.cuda.memory_allocated(self.env.device) / 1e9
            values["memory_cuda_reserved_gb"] = torch.cuda.memory_reserved(self.env.device) / 1e9
        return values
