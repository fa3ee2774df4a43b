"""Weights & Biases: rank 0's metrics logged to a W&B run that a resumed Keel run continues."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from keel.errors import ConfigError


class WandbSink:
    """Logs every record with `wandb.log(values, step=step)`; the run dir fixes the run id, so a resume appends."""

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any]):
        try:
            import wandb  # optional: only a run with observe.wandb = true needs it
        except ImportError:
            raise ConfigError(
                "observe.wandb is on but the wandb package is not installed; `pip install wandb` or set "
                "observe.wandb=false"
            ) from None
        run_dir = Path(run_dir).resolve()
        run_id = f"{run_name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"
        self._run = wandb.init(
            project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=config
        )
        self.url = getattr(self._run, "url", None)

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()
