"""Downstream tasks through EleutherAI's lm-evaluation-harness, run on the run's Hugging Face export."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from keel.checkpoint.hf import export_hf
from keel.errors import ConfigError

# Tasks Keel ships (a YAML file and its JSON Lines data), usable by name and offline.
TASKS_DIR = Path(__file__).with_name("tasks")
INSTALL = "pip install 'lm-eval[hf]==0.4.13'"


def keel_tasks() -> dict[str, Path]:
    """Keel's own task files by task name."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _absolute(files: Any, base: Path) -> Any:
    """data_files with relative paths made relative to the task file's directory (lm-eval reads them from the cwd)."""
    if isinstance(files, dict):
        return {split: _absolute(f, base) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    return str(base / files) if isinstance(files, str) and not Path(files).is_absolute() else files


def task_spec(name: str) -> str | dict[str, Any]:
    """What lm-eval is given for one --harness entry: Keel's task or a YAML file as a config, else the name."""
    path = keel_tasks().get(name) or (Path(name) if name.endswith((".yaml", ".yml")) else None)
    if path is None:
        return name  # one of lm-eval's own tasks; lm-eval downloads its data unless HF_DATASETS_OFFLINE=1
    if not path.is_file():
        raise ConfigError(f"--harness {name}: no such task file")
    import yaml  # lm-eval's dependency, there once Harness got past its import

    try:
        # safe_load: a task file is data, so `!function` (code named by the file) is refused (invariant 7).
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"--harness {path}: not a readable task YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise ConfigError(f"--harness {path}: a task file is a YAML mapping with a `task` key")
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], path.parent.resolve())}
    return config


def _summary(results: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """{task: {"samples": n, metric: value, metric_stderr: value}} from lm-eval's results (filter `none` dropped)."""
    out: dict[str, dict[str, float | int]] = {}
    for task, metrics in results["results"].items():
        entry: dict[str, float | int] = {}
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        if samples is not None:
            entry["samples"] = int(samples)
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if kind and isinstance(value, int | float):  # skips alias, name and "N/A" stderrs
                entry[metric if kind == "none" else key] = float(value)
        out[task] = entry
    return out


class Harness:
    """lm-eval tasks checked up front (a bad name fails before any work), then run on a checkpoint's export."""

    def __init__(self, tasks: list[str], limit: int | None = None):
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager
        except ImportError as e:
            raise ConfigError(f"--harness needs lm-evaluation-harness ({e}); {INSTALL}") from None
        self.version, self.limit = lm_eval.__version__, limit
        self.specs = [task_spec(t) for t in tasks]
        names = [s for s in self.specs if isinstance(s, str)]
        # Indexing lm-eval's thousands of built-in task files takes seconds: only when a task is named from them.
        self.manager = TaskManager(include_defaults=bool(names))
        unknown = [n for n in names if n not in self.manager.all_tasks]
        if unknown:
            raise ConfigError(
                f"--harness {unknown[0]}: no such lm-eval task, Keel task ({', '.join(keel_tasks())}) or .yaml file"
            )

    def run(self, run_dir: Path, step: int) -> dict[str, Any]:
        """Export checkpoint `step` to Hugging Face format in a temporary dir and run the tasks on it."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        with tempfile.TemporaryDirectory(prefix="keel-harness-") as tmp:
            model_dir = export_hf(run_dir, Path(tmp) / "hf", step)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = HFLM(pretrained=str(model_dir), device=device, batch_size=8, dtype="float32")
            results = lm_eval.simple_evaluate(
                model=model,
                tasks=self.specs,
                task_manager=self.manager,
                limit=self.limit,
                log_samples=False,
                bootstrap_iters=1000,
            )
        return {"lm_eval": self.version, "limit": self.limit, "tasks": _summary(results)}
