"""Which steps of trained runs read a document, and which of their committed checkpoints have seen it since.

The sample order is a pure function of (dataset, mixture weights, seed, index), so the global indices that read a
document are computed by inverting it; what a run did with the order is in its run dir: step s reads batch
position s - 1, until a rollback (events.jsonl) skips the batches since its checkpoint or a resume goes back to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keel.checkpoint.commit import committed_steps
from keel.config import Config
from keel.config_toml import load_config
from keel.data.lineage import sample_ids
from keel.data.loader import GlobalSampleOrder
from keel.data.mixture import BLOCK, MixtureOrder
from keel.data.versions import Version
from keel.errors import DataError
from keel.io import read_jsonl
from keel.observe.heartbeat import read_status
from keel.rundir import RunDir


@dataclass(frozen=True)
class Trajectory:
    """The batch positions a run's steps read: segments of consecutive positions, and what rollbacks undid."""

    segments: list[tuple[int, int]]  # (first step, the position it read); each later step reads the next one
    last: int  # the last step trained
    undone: list[tuple[int, int, int]]  # (first step, first position, end position) of batches a rollback skipped

    def spans(self) -> list[tuple[int, int, int]]:
        """(first step, last step, first position) of each segment the run trained."""
        ends = [s - 1 for s, _ in self.segments[1:]] + [self.last]
        return [(s, end, p) for (s, p), end in zip(self.segments, ends, strict=True) if end >= s]

    def end(self) -> int:
        """One past the highest batch position any step read."""
        return max([p + e - s + 1 for s, e, p in self.spans()] + [end for _, _, end in self.undone] + [0])

    def steps(self, positions: np.ndarray) -> np.ndarray:
        """The steps of the trained run that read these positions."""
        out = [np.zeros(0, dtype=np.int64)]
        for first, last, p in self.spans():
            out.append(positions[(positions >= p) & (positions <= p + last - first)] - p + first)
        return np.concatenate(out)

    def undone_steps(self, positions: np.ndarray) -> np.ndarray:
        """The steps, later rolled back, that read these positions."""
        out = [np.zeros(0, dtype=np.int64)]
        for first, lo, hi in self.undone:
            out.append(positions[(positions >= lo) & (positions < hi)] - lo + first)
        return np.concatenate(out)


def trajectory(run: RunDir) -> Trajectory:
    """Replay a run's rollbacks and resumes (events.jsonl) into the positions each of its steps read."""
    segments, undone = [(1, 0)], []
    boundary_time, boundary_step = 0.0, 0
    for e in read_jsonl(run.events):
        if e.get("event") == "rollback":
            to, (first, resume_at) = e["to_step"], e["skipped_batches"]
            undone.append((to + 1, first, resume_at))
            segments = [s for s in segments if s[0] <= to] + [(to + 1, resume_at)]
        elif e.get("event") == "resume":
            to = e["step"]
            segments = [s for s in segments if s[0] <= to] or [(1, 0)]
            s, p = segments[-1]
            if to:
                segments.append((to + 1, p + to - s + 1))  # the checkpoint holds the position after its step's
        else:
            continue
        boundary_time, boundary_step = e.get("time", 0.0), segments[-1][0] - 1
    # The last step: the newest record written after the last rollback or resume, or the newest checkpoint.
    metrics = read_jsonl(run.metrics)[-1:]
    status = read_status(run.root)
    reports = [(r.get("time", 0.0), r.get("step", 0)) for r in metrics]
    reports.append((status.get("updated_at", 0.0), status.get("step", 0)))
    ends = [e for e in read_jsonl(run.events) if e.get("event") in ("finish", "stop")]
    reports += [(e.get("time", 0.0), e.get("step", 0)) for e in ends]
    last = max([boundary_step, *committed_steps(run.checkpoints)[-1:]] + [s for t, s in reports if t >= boundary_time])
    return Trajectory(segments, last, undone)


@dataclass(frozen=True)
class RunLineage:
    """What one run did with a document."""

    run: Path
    seed: int
    last: int  # steps trained
    version: str  # the dataset version it trained on ("now", or before which removal)
    steps: list[int]  # steps that read the document
    undone: list[int]  # steps that read it and a rollback undid
    checkpoints: list[int]  # committed checkpoints at or after the first of `steps`
    validation: bool  # the document is in the validation split the run evaluates on


def run_lineage(dataset: Path, versions: list[Version], run_dir: Path) -> RunLineage:
    """Which steps of the run in run_dir read the document whose spans `versions` gives; another dataset is an error."""
    run = RunDir(run_dir).require(DataError)
    cfg = load_config(run.config)
    data = cfg.data
    # The datasets it trained on, in the loader's order (dataset k of a mixture has its own seed).
    paths = list(data.mixture) or [data.dataset]
    hashes = [data.mixture_sha256.get(p) for p in paths] if data.mixture else [data.manifest_sha256]
    by_hash = {v.sha256: v for v in versions}
    k = next((i for i, h in enumerate(hashes) if h in by_hash), None)
    held_out = by_hash.get(data.manifest_sha256)
    if k is None and held_out is None:
        raise _another_dataset(run.root, Path(dataset), paths, hashes, versions)
    traj = trajectory(run)
    steps = undone = np.zeros(0, dtype=np.int64)
    version = (held_out if k is None else by_hash[hashes[k]]).label
    if k is not None:
        positions = _positions(cfg, by_hash[hashes[k]], k, traj.end())
        steps, undone = traj.steps(positions), traj.undone_steps(positions)
    first = int(steps.min()) if steps.size else None
    return RunLineage(
        run=run.root,
        seed=cfg.run.seed,
        last=traj.last,
        version=version,
        steps=sorted(steps.tolist()),
        undone=sorted(undone.tolist()),
        checkpoints=[c for c in committed_steps(run.checkpoints) if first is not None and c >= first],
        validation=held_out is not None and any(d.split == "val" for d in held_out.spans),
    )


def _another_dataset(
    run: Path, dataset: Path, paths: list[str], hashes: list[str | None], versions: list[Version]
) -> DataError:
    """The one-line refusal for a run that read none of the dataset's versions: which it read, and what to pass."""
    now = versions[0].sha256[:12]
    for path, digest in zip(paths, hashes, strict=True):
        if Path(path).resolve() == dataset.resolve():  # prepared again in place, or changed in a way not recorded
            return DataError(
                f"run {run} was trained on another version of {dataset} (manifest hash {(digest or '?')[:12]}; it "
                f"is now {now} and its removal records describe no version with that hash); pass a copy of the "
                "dataset as the run read it, or leave the run out"
            )
    earlier = " or an earlier version" if len(versions) > 1 else ""
    return DataError(
        f"run {run} was trained on another dataset ({paths[0]}, manifest hash {(hashes[0] or '?')[:12]}; "
        f"{dataset} has {now}{earlier}); pass the dataset the run was trained on, or leave the run out"
    )


def _positions(cfg: Config, version: Version, k: int, end: int) -> np.ndarray:
    """The batch positions below `end` whose global batch holds a sample of the document (training dataset k)."""
    seq_len, batch = cfg.train.seq_len, cfg.train.global_batch_size
    count = (version.split_tokens.get("train", 0) - 1) // seq_len
    wanted = np.zeros(max(count, 0), dtype=bool)
    for span in version.spans:
        if span.split == "train":
            ids = sample_ids(span, seq_len)
            wanted[ids.start : min(ids.stop, count)] = True
    if not wanted.any():
        return np.zeros(0, dtype=np.int64)
    limit = end * batch
    order = GlobalSampleOrder(count, cfg.run.seed + k)  # as BatchLoader seeds each dataset of a mixture
    if not cfg.data.mixture:
        return np.unique(order.indices_of(wanted, limit) // batch)
    mixture = MixtureOrder(list(cfg.data.mixture.values()), cfg.run.seed)
    indices = mixture.global_indices(k, order.indices_of(wanted, -(-limit // BLOCK) * mixture.quotas[k]))
    return np.unique(indices[indices < limit] // batch)


def lineage_lines(lineage: RunLineage) -> list[str]:
    """`keel data lineage --run`'s lines for one run."""
    r = lineage
    head = f"run {r.run} (seed {r.seed}, {r.last} steps, the dataset {r.version})"
    lines = [f"{head}: " + (f"{_ranges(r.steps)} read it" if r.steps else "no step read it")]
    if r.validation:
        lines.append(f"run {r.run}: it is in the validation split the run evaluates on (never trained on)")
    if r.undone:
        lines.append(f"run {r.run}: {_ranges(r.undone)} also read it before a rollback undid it")
    if r.steps:
        held = ", ".join(f"step_{c}" for c in r.checkpoints) or "none yet"
        lines.append(f"run {r.run}: committed checkpoints that have seen it: {held}")
    return lines


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 7] -> 'steps 1-3, 7'; [4] -> 'step 4'."""
    out: list[list[int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        elif not out or v != out[-1][1]:
            out.append([v, v])
    return ("step " if len(values) == 1 else "steps ") + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)
