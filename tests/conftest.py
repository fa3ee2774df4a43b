"""Shared fixtures: a tiny prepared dataset, a tiny model config, and a way to run the `keel` command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WORDS = (
    "the model reads tokens and predicts the next one while the optimizer follows the gradient down "
    "a checkpoint keeps the state so training can resume exactly where it stopped on any number of ranks"
).split()


RANDOM_WORDS = [f"w{i}" for i in range(3000)]


def quiet(_: str) -> None:
    """A log callback that drops every line."""


def dedup_verdicts(store, batches) -> list:
    """Add batches of Keys to a DedupStore; then the stage dropping each document in order, or None."""
    from keel.data.dedup_store import STAGES

    for batch in batches:
        store.add(batch)
    return [STAGES.get(v) for run in store.decide() for v in run.verdicts.tolist()]


def random_document(rng: random.Random, words: int = 120) -> str:
    """Words drawn at random from a large vocabulary: two such documents are never near duplicates."""
    return " ".join(rng.choice(RANDOM_WORDS) for _ in range(words))


def near_copy(text: str) -> str:
    """The text with its middle word changed: a planted near duplicate."""
    words = text.split()
    words[len(words) // 2] = "changed"
    return " ".join(words)


def synthetic_corpus(directory: Path, documents: int = 300, seed: int = 0) -> Path:
    """Write a deterministic small corpus of text files and a JSON Lines file."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(documents):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "."
        if i % 3 == 0:
            (directory / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
        else:
            lines.append(json.dumps({"text": text, "id": i}))
    (directory / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(autouse=True)
def no_leaked_launch_time() -> Iterator[None]:
    """An in-process `keel train` stamps its launch time into os.environ (for the goodput ledger); a later test's
    `keel train` processes would inherit it and count the whole session as their start-up."""
    yield
    os.environ.pop("KEEL_LAUNCH_TIME", None)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A prepared dataset of the synthetic corpus (vocab 512), shared by the whole session."""
    from keel.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("dataset")
    corpus = synthetic_corpus(root / "corpus")
    out = root / "prepared"
    prepare_dataset(
        [str(corpus / "*.txt"), str(corpus / "*.jsonl")], out, vocab_size=512, val_fraction=0.1, log=lambda msg: None
    )
    return out


TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64}


def tiny_config(path: Path, dataset: Path, **sections: dict) -> Path:
    """Write a config for a tiny fp32 model on `dataset`; `sections` override keys per section."""
    from keel.config_toml import dump_toml

    table = {
        "run": {"name": "tiny", "seed": 0},
        "model": {"name": "llama", **TINY_MODEL},
        "data": {"dataset": str(dataset)},
        "train": {"steps": 5, "seq_len": 32, "global_batch_size": 8, "eval_every": 0, "precision": "fp32"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "parallel": {"nproc": 1},
        "checkpoint": {"every": 0, "keep": 2},
        "observe": {"log_every": 1, "tensorboard": False},
    }
    for name, values in sections.items():
        table.setdefault(name, {}).update(values)
    path.write_text(dump_toml(table), encoding="utf-8")
    return path


def run_keel(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m keel ARGS` in `cwd` and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "keel", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def keel_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`keel ARGS` in this process (the console script's entry point, without an interpreter start): its exit code
    and output."""
    from keel.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), exit_.value.code, out.out, out.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Check that a `keel` run failed with exit code 2 and one `keel: error:` line holding every fragment."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keel: error: ") and "Traceback" not in result.stderr, lines
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory nobody may write to (see read_only), for the duration of a test."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    with read_only(directory):
        yield directory


def dataset_text(dataset: Path) -> str:
    """Every token of a prepared dataset's splits, decoded back to text."""
    from keel.data.dataset import TokenDataset
    from keel.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(dataset / "tokenizer.json"))
    parts = []
    for split in ("train", "val"):
        ds = TokenDataset(dataset, split)
        parts.append(tok.decode(ds.read(0, ds.num_tokens).tolist()))
    return " ".join(parts)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    """The training loss at every step of a run, in step order."""
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@contextmanager
def read_only(directory: Path) -> Iterator[Path]:
    """Make an existing directory read-only for the block: chmod 555, or a read-only bind mount as root."""
    # Root writes whatever the permissions, so only a read-only mount stops it; where mounting fails, skip.
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield directory
        finally:
            directory.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make a read-only mount as root: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True, capture_output=True)
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


AUDIT_TEMPLATES = ROOT / "tests" / "data" / "audit_small.txt"


def _words_corpus(directory: Path, alphabet: str, files: int, seed: int) -> str:
    """Files of short documents whose words use only `alphabet`: every token tells which corpus it came from."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for i in range(files):
        words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(8, 30)))
        (directory / f"{i:03d}.txt").write_text(" ".join(words), encoding="utf-8")
    return str(directory / "*.txt")


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """A dataset of two sources (letters/*.txt, digits/*.txt: words of letters, of digits) and a second dataset."""
    from keel.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("sources")
    both, extra, corpus = root / "both", root / "extra", root / "corpus"
    letters = _words_corpus(corpus / "letters", "abcdefgh", 60, 0)
    globs = [letters, _words_corpus(corpus / "digits", "0123456789", 60, 1)]
    prepare_dataset(globs, both, vocab_size=320, val_fraction=0.2, log=quiet)
    extra_glob = _words_corpus(corpus / "extra", "abcd0123", 40, 2)
    prepare_dataset([extra_glob], extra, tokenizer=str(both / "tokenizer.json"), val_fraction=0.2, log=quiet)
    return both, extra


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, two_sources) -> Path:
    """A tiny run of two FSDP ranks on the mixture of both datasets, validated and audited (the small templates)
    every 2 steps, with checkpoints at steps 2 and 4: shared by the evaluation and the audit tests."""
    both, extra = two_sources
    tmp = tmp_path_factory.mktemp("evalrun")
    config = tiny_config(
        tmp / "c.toml",
        both,
        train={"steps": 4, "eval_every": 2},
        data={"mixture": {str(both): 1.0, str(extra): 1.0}},
        checkpoint={"every": 2},
        parallel={"nproc": 2},
        observe={"audit_every": 2, "audit_templates": str(AUDIT_TEMPLATES)},
    )
    result = run_keel("train", str(config), cwd=tmp, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "tiny"
