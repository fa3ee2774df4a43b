"""Validation loss: the training objective on held-out batches, without gradients, on a schedule."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from keel.callback import Callback, StepOutcome
from keel.config import Config
from keel.data.dataset import TokenDataset
from keel.data.loader import Batch, eval_batches
from keel.distributed.env import all_reduce_mean
from keel.distributed.mesh import Mesh
from keel.observe.step_timer import StepTimer


class Validation(Callback):
    """Validation loss every `train.eval_every` steps, at the last step, and once before training (step 0)."""

    def __init__(
        self,
        evaluate: Callable[[Iterable[Batch]], torch.Tensor],
        dataset: TokenDataset,
        cfg: Config,
        mesh: Mesh,
        timer: StepTimer,
        record: Callable[[int, dict[str, float]], None],
    ):
        # evaluate: this rank's mean loss over batches, forward only, however the model is parallelised.
        self.evaluate_batches, self.dataset, self.cfg, self.mesh = evaluate, dataset, cfg, mesh
        self.every, self.timer, self.record = cfg.train.eval_every, timer, record

    def on_train_start(self, step: int) -> None:
        if self.every and step == 0:
            self.record(0, {"val_loss": self.evaluate()})  # the untrained baseline every curve starts from

    def after_step(self, outcome: StepOutcome) -> None:
        if self.every and not outcome.discarded and (outcome.step % self.every == 0 or outcome.last):
            with self.timer.phase("eval"):
                outcome.values["val_loss"] = self.evaluate()

    def evaluate(self) -> float:
        """Validation loss over `train.eval_batches` global batches, averaged over all ranks."""
        train, data = self.cfg.train, self.cfg.data
        batches = eval_batches(
            self.dataset,
            seq_len=train.seq_len,
            batch_size=train.global_batch_size,
            num_batches=train.eval_batches,
            rank=self.mesh.dp_rank,
            world_size=self.mesh.dp_size,
            document_positions=data.document_positions,
            document_mask=data.document_mask,
        )
        return float(all_reduce_mean(self.evaluate_batches(batches)))
