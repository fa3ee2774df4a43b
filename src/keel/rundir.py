"""The run directory's layout, named once: every module asks RunDir for a path instead of spelling it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keel.errors import KeelError

CHECKPOINT_PREFIX = "step_"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step`."""
    return f"{CHECKPOINT_PREFIX}{step}"


def step_of(path: Path | str) -> int | None:
    """The step a `step_<N>` checkpoint directory was taken after, or None for any other name."""
    suffix = Path(path).name.removeprefix(CHECKPOINT_PREFIX)
    if suffix == Path(path).name or not suffix.isdigit():
        return None
    return int(suffix)


@dataclass(frozen=True)
class RunDir:
    """A run dir: `keel train --resume RUN_DIR` needs nothing else, and tools read it by these names."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        """The resolved config the run trains with (config.toml)."""
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        """One JSON object per recorded step."""
        return self.root / "metrics.jsonl"

    @property
    def metrics_rolled_back(self) -> Path:
        """Records of attempts that died after their last checkpoint, moved aside on resume."""
        return self.root / "metrics.rolled_back.jsonl"

    @property
    def events(self) -> Path:
        """Incidents: start, resume, checkpoint, restart, preemption, ... one JSON object per line."""
        return self.root / "events.jsonl"

    @property
    def status(self) -> Path:
        """The heartbeat: state, step, loss, last checkpoint, updated_at."""
        return self.root / "status.json"

    @property
    def tokenizer(self) -> Path:
        """The dataset's tokenizer, copied in, so generation and export need only the run dir."""
        return self.root / "tokenizer.json"

    @property
    def checkpoints(self) -> Path:
        """Where `step_<N>/` checkpoint directories live."""
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint directory of `step` (committed or not)."""
        return self.checkpoints / checkpoint_name(step)

    @property
    def logs(self) -> Path:
        """Per-rank logs."""
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        """The log file of global rank `rank`."""
        return self.logs / f"rank{rank}.log"

    def rank_progress(self, rank: int) -> Path:
        """Where global rank `rank` is (step, phase, liveness), for the hang watchdog and the launcher."""
        return self.logs / f"rank{rank}.progress"

    def launcher_log(self, node_rank: int = 0) -> Path:
        """torchrun's own output (its error report, the workers' warnings), kept off the console; one per node."""
        return self.logs / ("torchrun.log" if node_rank == 0 else f"torchrun.node{node_rank}.log")

    @property
    def worker_error(self) -> Path:
        """The one-line KeelError a torchrun worker stopped with, for `keel train` to print as its own."""
        return self.logs / "worker_error.txt"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files."""
        return self.root / "tb"

    @property
    def profiles(self) -> Path:
        """torch.profiler traces and CUDA memory snapshots."""
        return self.root / "profiles"

    @property
    def report(self) -> Path:
        """The self-contained HTML report."""
        return self.root / "report.html"

    @property
    def model_card(self) -> Path:
        """The model card, written when a run ends and by `keel card`; exported as the model's README.md."""
        return self.root / "model_card.md"

    @property
    def eval_results(self) -> Path:
        """The last `keel eval`: validation loss and perplexity per source and mixture dataset, harness scores."""
        return self.root / "eval.json"

    @property
    def audit_results(self) -> Path:
        """The last `keel audit`: the bias probe's log-likelihood gap per axis with confidence intervals."""
        return self.root / "audit.json"

    def is_run(self) -> bool:
        """True once a run has passed preflight here (its config.toml exists)."""
        return self.config.is_file()

    def require(self, error: type[KeelError] = KeelError) -> RunDir:
        """This run dir, or `error` if it holds no run."""
        if not self.is_run():
            raise error(f"{self.root}: not a Keel run dir (no config.toml); pass the directory `keel train` made")
        return self
