"""Bad command-line input and bad configs give one clear line on stderr and exit code 2, and lose nothing."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, keel_here, run_keel, tiny_config


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["train", "--nosuch"], ["No such option: --nosuch", "keel train --help"]),
        (["train", "--nproc", "zero"], ["Invalid value for '--nproc'"]),
        (["train", "--nproc", "0"], ["--nproc"]),
        (["frobnicate"], ["No such command 'frobnicate'"]),
        (["train"], ["needs a CONFIG file"]),
        (["train", "missing.toml"], ["missing.toml: config file not found"]),
        (["train", "--resume", "nowhere"], ["--resume nowhere: no config.toml there"]),
    ],
)
def test_bad_cli_input_is_one_line_with_exit_code_2(tmp_path, args, fragments):
    assert_one_line_error(run_keel(*args, cwd=tmp_path), *fragments)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=0", "train.steps: Input should be greater than 0"),
        ("model.dim=65", "model.dim"),
        ("model.bogus=1", "model.bogus"),
        ("train.global_batch_size=7", "train.global_batch_size 7 does not split over 2 data-parallel ranks"),
        ("train.seq_len=4096", "train.seq_len 4096 exceeds model.max_seq_len 64"),
        ("data.dataset='/nonexistent/data'", "/nonexistent/data"),
    ],
)
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, dataset, override, fragment):
    config = tiny_config(tmp_path / "c.toml", dataset, parallel={"nproc": 2})
    result = run_keel("train", str(config), "--set", override, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs" / "tiny" / "config.toml").exists()


def test_starting_another_run_in_an_existing_run_dir_is_refused_and_keeps_it(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 2})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    before = (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text()
    other = run_keel("train", str(config), "--set", "train.steps=3", cwd=tmp_path)
    assert_one_line_error(other, "already holds a run with train.steps = 2, not 3", "--resume")
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text() == before
    # The same command again is the same run (a requeued job): it continues, and a finished run stays finished.
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text() == before


def test_help_config_lists_every_key_with_its_doc(tmp_path):
    result = run_keel("train", "--help-config", cwd=tmp_path)
    assert result.returncode == 0
    for key in (
        "train.steps",
        "optim.lr",
        "parallel.dp_shard",
        "checkpoint.every",
        "model.n_kv_heads",
        "prepare.sources",
    ):
        assert key in result.stdout


def test_an_unknown_model_key_is_refused_by_every_command_that_loads_a_config(tmp_path, dataset, capsys, monkeypatch):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 1})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    before = (run / "config.toml").read_text()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"document {i} holds some text to prepare " * 20)
    out = tmp_path / "prepared"
    bogus = ["--set", "model.bogus=1"]
    sources = f'prepare.sources=["{corpus}/*.txt"]'
    commands = [
        ["train", str(config), "--set", "run.name=other", *bogus],
        ["train", "--resume", str(run), "--set", "train.steps=2", *bogus],
        ["data", "prepare", "--source", f"{corpus}/*.txt", "--out", str(out), *bogus],
        ["demo", "--nproc", "1", "--set", sources, "--set", f"data.dataset={str(out)!r}", *bogus],
    ]
    monkeypatch.chdir(tmp_path)
    for command in commands:  # in this process: each is refused before anything starts
        assert_one_line_error(keel_here(capsys, *command), "model.bogus: unknown key")
        assert not out.exists() and not (tmp_path / "runs" / "other").exists(), command
    assert (run / "config.toml").read_text() == before
