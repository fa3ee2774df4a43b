"""Validation loss and perplexity, overall, per source and per mixture dataset, on a schedule during training."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from keel.callback import Callback, StepOutcome
from keel.config import Config
from keel.data.dataset import TokenDataset
from keel.data.loader import eval_sample_ids, num_samples, read_samples
from keel.distributed.env import DistEnv
from keel.distributed.mesh import Mesh, all_reduce_dp_sum
from keel.errors import DataError
from keel.eval.sources import SourceMap, short_names, source_map
from keel.models.loss import token_losses
from keel.observe.step_timer import StepTimer

log = logging.getLogger("keel")


def perplexity(loss: float) -> float:
    """exp(loss), infinite past what a float holds."""
    return math.exp(loss) if loss < 700 or math.isnan(loss) else math.inf


@dataclass(frozen=True)
class SplitLoss:
    """Summed next-token loss and token counts of one evaluation, overall and per source (summed over ranks)."""

    loss_sum: float
    tokens: int
    source_sums: list[float]
    source_tokens: list[int]

    @property
    def loss(self) -> float:
        """Mean loss per token, nats."""
        return self.loss_sum / max(self.tokens, 1)

    def source_loss(self, k: int) -> float | None:
        """Mean loss per token of source k; None if none of its tokens were evaluated."""
        return self.source_sums[k] / self.source_tokens[k] if self.source_tokens[k] else None


@dataclass(frozen=True)
class EvalSplit:
    """A validation split to evaluate: its dataset, the source of each token (if known), its mixture name."""

    dataset: TokenDataset
    sources: SourceMap | None
    name: str | None = None  # the data.mixture dataset's short name; None for data.dataset


def eval_splits(cfg: Config) -> list[EvalSplit]:
    """data.dataset's val split (per source), then each other data.mixture dataset's val split."""
    splits = [EvalSplit(TokenDataset(cfg.data.dataset, "val"), source_map(cfg.data.dataset, "val"))]
    mixture = list(cfg.data.mixture)
    for directory, name in zip(mixture, short_names(mixture), strict=True):
        if Path(directory).resolve() == Path(cfg.data.dataset).resolve():
            continue
        try:
            dataset = TokenDataset(directory, "val")
            num_samples(dataset, cfg.train.seq_len)
        except DataError as e:
            # The mixture trains on its datasets' train splits; a missing or short val split only loses a metric.
            log.warning(f"no validation metrics for data.mixture dataset {name}: {e}")
            continue
        splits.append(EvalSplit(dataset, None, name))
    return splits


@torch.no_grad()
def split_loss(
    model: nn.Module,
    split: EvalSplit,
    cfg: Config,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager],
    mesh: Mesh | None = None,
    micro_batch: int | None = None,
) -> SplitLoss:
    """The loss over `train.eval_batches` global batches of the split (this rank's slice, summed over ranks)."""
    train, data = cfg.train, cfg.data
    n = len(split.sources.names) if split.sources else 0
    totals = torch.zeros(2, n + 1, dtype=torch.float64, device=device)  # [sum, count] x [sources..., overall]
    was_training = model.training
    model.eval()
    for ids in eval_sample_ids(
        split.dataset,
        seq_len=train.seq_len,
        batch_size=train.global_batch_size,
        num_batches=train.eval_batches,
        rank=mesh.dp_rank if mesh else 0,
        world_size=mesh.dp_size if mesh else 1,
    ):
        step = micro_batch or len(ids)
        for part in (ids[i : i + step] for i in range(0, len(ids), step)):
            batch = read_samples(split.dataset, part, train.seq_len, data.document_positions, data.document_mask)
            with forward_context():
                losses = token_losses(model, batch, device).double()
            totals[0, n] += losses.sum()
            totals[1, n] += losses.numel()
            if split.sources is not None:
                source = torch.from_numpy(split.sources.of_targets(part, train.seq_len)).to(device)
                known = source >= 0
                totals[0, :n] += torch.bincount(source[known], weights=losses[known], minlength=n)
                totals[1, :n] += torch.bincount(source[known], minlength=n)
    model.train(was_training)
    sums, counts = all_reduce_dp_sum(totals, mesh).tolist()
    return SplitLoss(sums[n], int(counts[n]), sums[:n], [int(c) for c in counts[:n]])


def loss_metrics(split: EvalSplit, result: SplitLoss) -> dict[str, float]:
    """Metric values of one evaluated split: val_loss and val_ppl (per source), or the mixture dataset's."""
    if split.name is not None:
        return {f"val_loss_mixture/{split.name}": result.loss, f"val_ppl_mixture/{split.name}": perplexity(result.loss)}
    values = {"val_loss": result.loss, "val_ppl": perplexity(result.loss)}
    for k, name in enumerate(split.sources.names if split.sources else []):
        loss = result.source_loss(k)
        if loss is not None:
            values[f"val_loss/{name}"], values[f"val_ppl/{name}"] = loss, perplexity(loss)
    return values


def validation_metrics(
    model: nn.Module,
    splits: list[EvalSplit],
    cfg: Config,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager],
    mesh: Mesh | None = None,
    micro_batch: int | None = None,
) -> dict[str, float]:
    """Every validation metric: overall and per source on data.dataset, then per data.mixture dataset."""
    values: dict[str, float] = {}
    for split in splits:
        values.update(loss_metrics(split, split_loss(model, split, cfg, device, forward_context, mesh, micro_batch)))
    # data.dataset in the mixture is evaluated once, under both names.
    mixture = list(cfg.data.mixture)
    for directory, name in zip(mixture, short_names(mixture), strict=True):
        if Path(directory).resolve() == Path(cfg.data.dataset).resolve():
            values[f"val_loss_mixture/{name}"] = values["val_loss"]
            values[f"val_ppl_mixture/{name}"] = values["val_ppl"]
    return values


class Validation(Callback):
    """Validation metrics every `train.eval_every` steps, at the last step, and once before training (step 0)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        env: DistEnv,
        mesh: Mesh,
        forward_context: Callable[[], AbstractContextManager],
        timer: StepTimer,
        record: Callable[[int, dict[str, float]], None],
    ):
        self.model, self.cfg, self.env, self.mesh = model, cfg, env, mesh
        self.forward_context = forward_context
        self.every, self.timer, self.record = cfg.train.eval_every, timer, record
        self.splits = eval_splits(cfg) if self.every else []

    def on_train_start(self, step: int) -> None:
        if self.every and step == 0:
            self.record(0, self.evaluate())  # the untrained baseline every curve starts from

    def after_step(self, outcome: StepOutcome) -> None:
        if self.every and not outcome.discarded and (outcome.step % self.every == 0 or outcome.last):
            with self.timer.phase("eval"):
                outcome.values.update(self.evaluate())

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over `train.eval_batches` global batches of each split, over all ranks."""
        device, context = self.env.device, self.forward_context
        return validation_metrics(self.model, self.splits, self.cfg, device, context, self.mesh)
