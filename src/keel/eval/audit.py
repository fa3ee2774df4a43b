"""Bias audit: a counterfactual likelihood probe over sentences that differ only in a demographic term."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keel.callback import Callback, StepOutcome
from keel.checkpoint.inference import checkpoint_path, load_model
from keel.config import Config
from keel.data.tokenizer import eos_id, load_tokenizer
from keel.distributed.env import DistEnv
from keel.distributed.mesh import Mesh, all_reduce_dp_sum
from keel.errors import CheckpointError
from keel.eval.templates import SLOT, Axis, load_templates, templates_path
from keel.io import atomic_write_json, filesystem_errors, sha256_file
from keel.models import model_args
from keel.models.loss import token_cross_entropy
from keel.observe.events import EventLog
from keel.observe.step_timer import StepTimer
from keel.rundir import RunDir, step_of

FORMAT = "keel-audit/1"
SCORE = "mean log-likelihood per token (nats) of the words after the term, given the sentence up to and with it"
BATCH = 32  # sentences per forward pass


@dataclass(frozen=True)
class Probe:
    """Every sentence of every axis as token ids, with how many of its last tokens are scored."""

    axes: list[Axis]
    ids: list[list[int]]  # EOS (the model's document start), then the sentence; in axis, template, group, term order
    scored: list[int]  # the tokens after the term, cut so the sentence fits in the model's context


def build_probe(axes: list[Axis], tokenizer_path: Path, max_len: int | None) -> Probe:
    """Each template with each term as token ids; the words after the slot are encoded alone (the same tokens)."""
    tokenizer = load_tokenizer(tokenizer_path)
    eos = eos_id(tokenizer)
    ids, scored = [], []
    for axis in axes:
        for template in axis.templates:
            prefix, suffix = template.split(SLOT)
            tail = tokenizer.encode(suffix).ids
            for term in itertools.chain(*axis.groups.values()):
                sentence = [eos, *tokenizer.encode(prefix + term).ids, *tail]
                # A sentence longer than the context loses its start, as a long document does; the words after
                # the term are kept (all but the first, if even they are longer).
                sentence = sentence[-max_len - 1 :] if max_len else sentence
                ids.append(sentence)
                scored.append(min(len(tail), len(sentence) - 1))
    return Probe(axes, ids, scored)


@torch.no_grad()
def score(
    model: nn.Module,
    probe: Probe,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Each sentence's score; data-parallel ranks score equal slices and sum, all running as many forward passes."""
    rank, world = (mesh.dp_rank, mesh.dp_size) if mesh else (0, 1)
    tp = mesh.layout.tp if mesh else 1
    n = len(probe.ids)
    per = -(-n // world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    padded = mine + [0] * (per - len(mine))  # a rank with fewer sentences repeats one, and drops its score
    scores = torch.zeros(n, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(0, per, BATCH):
        rows = padded[start : start + BATCH]
        # Sequence parallel splits the positions evenly over the tensor-parallel ranks: pad to a multiple of tp.
        width = -(-(max(len(probe.ids[j]) for j in rows) - 1) // tp) * tp
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        targets = torch.zeros_like(inputs)
        mask = torch.zeros(len(rows), width, dtype=torch.float64)
        for r, j in enumerate(rows):
            ids, length = probe.ids[j], len(probe.ids[j]) - 1
            inputs[r, :length], targets[r, :length] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
            mask[r, length - probe.scored[j] : length] = 1  # right padding: causal attention never sees it
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        with forward_context():
            logp = -token_cross_entropy(model(inputs), targets).double()
        means = (logp * mask).sum(1) / mask.sum(1)
        real = max(0, min(len(rows), len(mine) - start))
        scores[rows[:real]] = means[:real]
    model.train(was_training)
    return all_reduce_dp_sum(scores, mesh).cpu().numpy()


def axis_tables(probe: Probe, scores: np.ndarray) -> list[np.ndarray]:
    """Per axis, [templates, groups]: each group's mean score over its terms in each template."""
    tables, at = [], 0
    for axis in probe.axes:
        groups, terms = len(axis.groups), len(next(iter(axis.groups.values())))
        size = len(axis.templates) * groups * terms
        tables.append(scores[at : at + size].reshape(len(axis.templates), groups, terms).mean(-1))
        at += size
    return tables


def gap(table: np.ndarray) -> float:
    """The largest difference between two groups' mean scores (max minus min, over templates)."""
    means = table.mean(0)
    return float(means.max() - means.min())


def summarize(axis: Axis, table: np.ndarray, bootstrap: int, seed: int) -> dict[str, Any]:
    """An axis's group means, gap and pairwise differences, with percentile bootstrap 95% intervals over templates."""
    names = list(axis.groups)
    means = table.mean(0)
    # Resampling whole templates keeps each template's variants together: the design is paired.
    rng = np.random.default_rng(seed)
    resampled = table[rng.integers(0, len(table), size=(bootstrap, len(table)))].mean(1)  # [bootstrap, groups]

    def interval(values: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(values, [2.5, 97.5])]

    return {
        "axis": axis.name,
        "templates": len(axis.templates),
        "sentences": table.size * len(next(iter(axis.groups.values()))),
        "groups": {name: float(m) for name, m in zip(names, means, strict=True)},
        "highest": names[int(means.argmax())],
        "lowest": names[int(means.argmin())],
        "gap": gap(table),
        "gap_ci95": interval(resampled.max(1) - resampled.min(1)),
        "pairs": [
            {
                "groups": [names[a], names[b]],
                "difference": float(means[a] - means[b]),
                "ci95": interval(resampled[:, a] - resampled[:, b]),
            }
            for a, b in itertools.combinations(range(len(names)), 2)
        ],
    }


def max_context(cfg: Config) -> int | None:
    """The model's context length (model.max_seq_len), if it has one."""
    return getattr(model_args(cfg.model_section())[1], "max_seq_len", None)


def audit_run(
    run_dir: Path, step: int | None = None, templates: str | None = None, bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Run the probe on checkpoint `step` (newest when None); write RUN_DIR/audit.json and an `audit` event."""
    run = RunDir(run_dir).require(CheckpointError)
    axes = load_templates(templates)  # a bad file is refused before the model is loaded
    path = checkpoint_path(run.root, step)
    step = step_of(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_model(run.root, step, device=str(device))
    probe = build_probe(axes, run.tokenizer, max_context(cfg))
    tables = axis_tables(probe, score(model, probe, device))
    file = templates_path(templates)
    record = {
        "format": FORMAT,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(path.resolve()),
        "templates": str(file.resolve()),
        "templates_sha256": sha256_file(file),
        "score": SCORE,
        "bootstrap": bootstrap,
        "seed": seed,
        "axes": [summarize(a, t, bootstrap, seed) for a, t in zip(axes, tables, strict=True)],
    }
    with filesystem_errors("write the audit results"):
        atomic_write_json(run.audit_results, record)
    gaps = {a["axis"]: a["gap"] for a in record["axes"]}
    EventLog(run.events)("audit", step=step, gaps=gaps, file=run.audit_results.name)
    return record


def audit_lines(record: dict[str, Any]) -> list[str]:
    """The human-readable summary of an audit.json record."""
    lines = [f"step {record['step']}: log-likelihood gap per axis (nats/token), 95% bootstrap interval"]
    for a in record["axes"]:
        low, high = a["gap_ci95"]
        lines.append(
            f"  {a['axis']:20} gap {a['gap']:.4f} [{low:.4f}, {high:.4f}]  highest {a['highest']}, "
            f"lowest {a['lowest']} ({a['templates']} templates, {a['sentences']} sentences)"
        )
    return lines


class Audit(Callback):
    """`observe.audit_every`: the probe on the live model, every rank taking part, as `audit_gap/<axis>` metrics."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        env: DistEnv,
        mesh: Mesh,
        forward_context: Callable[[], AbstractContextManager],
        timer: StepTimer,
        record: Callable[[int, dict[str, float]], None],
    ):
        self.every, self.model, self.env, self.mesh = cfg.observe.audit_every, model, env, mesh
        self.forward_context, self.timer, self.record = forward_context, timer, record
        tokenizer = RunDir(cfg.run_dir).tokenizer
        templates = cfg.observe.audit_templates
        self.probe = build_probe(load_templates(templates), tokenizer, max_context(cfg)) if self.every else None

    def on_train_start(self, step: int) -> None:
        if self.every and step == 0:
            self.record(0, self.measure())  # the untrained model's gaps: what training changes starts here

    def after_step(self, outcome: StepOutcome) -> None:
        if self.every and not outcome.discarded and (outcome.step % self.every == 0 or outcome.last):
            with self.timer.phase("eval"):
                outcome.values.update(self.measure())

    def measure(self) -> dict[str, float]:
        """Each axis's gap on the model as it is now."""
        assert self.probe is not None
        scores = score(self.model, self.probe, self.env.device, self.forward_context, self.mesh)
        tables = axis_tables(self.probe, scores)
        return {f"audit_gap/{a.name}": gap(t) for a, t in zip(self.probe.axes, tables, strict=True)}
