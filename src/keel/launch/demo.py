"""`keel demo`: the Python standard library in, a trained, evaluated, sampled model out, in runs/demo/."""

from __future__ import annotations

import json
import logging
import sysconfig
import time
from importlib import resources
from pathlib import Path

from keel.config_toml import load_config
from keel.data.manifest import load_manifest
from keel.data.prepare import prepare_from_config
from keel.eval.generate import sample_text
from keel.io import read_jsonl
from keel.launch.train import train
from keel.models import model_args
from keel.observe.logs import setup_logging
from keel.observe.report import write_report
from keel.rundir import RunDir

log = logging.getLogger("keel")


def demo_config_path() -> Path:
    """The embedded demo config (also at configs/demo.toml in the repository)."""
    return Path(str(resources.files("keel") / "configs" / "demo.toml"))


def stdlib_sources() -> list[str]:
    """Globs of the running interpreter's standard library sources (the demo corpus), minus installed
    packages and the few test files that are deliberately not UTF-8."""
    lib = sysconfig.get_paths()["stdlib"]
    return [
        f"{lib}/**/*.py",
        f"!{lib}/site-packages/**",
        f"!{lib}/dist-packages/**",
        f"!{lib}/test/encoded_modules/*",
        f"!{lib}/test/test_source_encoding.py",
        f"!{lib}/test/tokenizedata/badsyntax_pep3120.py",
    ]


def _set_aside(run_dir: Path) -> None:
    """Keep an earlier demo run (nothing written is lost) by renaming it runs/demo.1, runs/demo.2, ..."""
    if not run_dir.exists():
        return
    n = 1
    while run_dir.with_name(f"{run_dir.name}.{n}").exists():
        n += 1
    run_dir.rename(run_dir.with_name(f"{run_dir.name}.{n}"))
    log.info(f"moved the previous demo run to {run_dir.name}.{n}")


def run_demo(overrides: list[str], nproc: int) -> None:
    """Prepare the stdlib corpus (once), train with `nproc` processes, evaluate, and print a sample."""
    setup_logging(None, 0)
    started = time.perf_counter()
    config = demo_config_path()
    sources = stdlib_sources()
    overrides = [f"prepare.sources={json.dumps(sources)}", *overrides]
    cfg = load_config(config, overrides)
    if cfg.prepare.sources == sources and not cfg.prepare.licenses:
        # The standard library is under the PSF License, which the data and model cards then state.
        licenses = ", ".join(f'{json.dumps(glob)} = "PSF-2.0"' for glob in sources if not glob.startswith("!"))
        overrides.insert(1, f"prepare.licenses={{{licenses}}}")
        cfg = load_config(config, overrides)
    model_args(cfg.model_section())  # a bad [model] key is refused before the corpus is prepared
    dataset = Path(cfg.data.dataset)
    if (dataset / "manifest.json").exists():
        load_manifest(dataset)
        log.info(f"using the dataset already prepared in {dataset}")
    else:
        log.info(f"preparing {cfg.prepare.sources[0]} into {dataset}")
        prepare_from_config(cfg, log.info)
    _set_aside(cfg.run_dir)
    train(config, overrides, None, nproc)
    setup_logging(None, 0)
    val = [r["val_loss"] for r in read_jsonl(RunDir(cfg.run_dir).metrics) if "val_loss" in r]
    log.info(f"validation loss: {val[0]:.3f} at the first evaluation -> {val[-1]:.3f} at the last")
    log.info("sample (prompt 'def '):\n" + sample_text(cfg.run_dir, "def ", 80))
    log.info(f"plots: {write_report(cfg.run_dir)}")
    log.info(f"model card: {RunDir(cfg.run_dir).model_card}")
    log.info(f"demo finished in {time.perf_counter() - started:.0f} s; the run is in {cfg.run_dir}/")
