"""Weights & Biases: rank 0's metrics logged to a W&B run that a resumed Keel run continues."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from keel.errors import ConfigError
from keel.io import first_line

HOW_TO_LOG_IN = (
    "run `wandb login` (or set WANDB_API_KEY), log offline with WANDB_MODE=offline, or set observe.wandb=false"
)


def _import_wandb() -> Any:
    try:
        import wandb  # optional: only a run with observe.wandb = true needs it
    except ImportError:
        raise ConfigError(
            "observe.wandb is on but the wandb package is not installed; `pip install wandb` or set observe.wandb=false"
        ) from None
    return wandb


def check_wandb() -> None:
    """Refuse observe.wandb without the package or, online, without credentials; reads local settings, no network."""
    wandb = _import_wandb()
    try:
        # wandb's own lookup (WANDB_API_KEY, ~/.netrc, its settings files), as wandb.init makes it, minus the prompt.
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        if settings.mode in ("offline", "dryrun", "disabled"):
            return
        auth = wbauth.authenticate_session(host=settings.base_url, source="keel", prompt=False, update_session=False)
    except (ImportError, AttributeError, TypeError):
        return  # a wandb without these internals: wandb.init's own error, made one line by WandbSink, says it
    except wandb.errors.Error as e:
        raise ConfigError(f"observe.wandb: {first_line(e)}; {HOW_TO_LOG_IN}") from None
    if auth is None:
        raise ConfigError(f"observe.wandb: no W&B login found for {settings.base_url}; {HOW_TO_LOG_IN}")


class WandbSink:
    """Logs every record with `wandb.log(values, step=step)`; the run dir fixes the run id, so a resume appends."""

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict[str, Any]):
        wandb = _import_wandb()
        run_dir = Path(run_dir).resolve()
        run_id = f"{run_name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"
        try:
            self._run = wandb.init(
                project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir), config=config
            )
        except wandb.errors.Error as e:  # no login, no network, a refused project: one line, not wandb's traceback
            raise ConfigError(
                f"observe.wandb: W&B did not start ({first_line(e)}); check the login (`wandb login`) and the network, "
                "log offline with WANDB_MODE=offline, or set observe.wandb=false"
            ) from None
        self.url = getattr(self._run, "url", None)

    def write(self, step: int, time: float, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()
