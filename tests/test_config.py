"""The config schema: TOML presets load, overrides apply, and bad input names the key in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_keel
from keel.config import ROOT_SECTIONS, describe_keys
from keel.config_toml import apply_overrides, dump_toml, load_config, save_config
from keel.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("preset", ["demo.toml", "gpt2-124m.toml", "llama-1b.toml"])
def test_presets_load_and_round_trip_through_toml(preset, tmp_path):
    cfg = load_config(CONFIGS / preset)
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == cfg


def test_config_has_every_section_and_required_key():
    cfg = load_config(None)
    sections = {"run", "model", "data", "prepare", "train", "optim", "parallel", "checkpoint", "observe"}
    assert set(ROOT_SECTIONS) == sections | {"distributed", "resilience", "card"}
    for key in ("run.name", "run.dir", "train.steps", "train.global_batch_size", "checkpoint.every", "parallel.tp"):
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name)
    assert cfg.run_dir == Path("runs/keel")


def test_dotted_overrides_are_typed_by_toml():
    overrides = ["optim.lr=3e-4", "train.steps=20", "run.name=other", "train.compile=true"]
    cfg = load_config(CONFIGS / "demo.toml", overrides)
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 20 and cfg.run.name == "other" and cfg.train.compile is True
    assert cfg.run_dir == Path("runs/other")


def test_overrides_reach_nested_model_arguments():
    assert apply_overrides({"model": {"dim": 1}}, ["model.dim=8"]) == {"model": {"dim": 8}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=-5", "train.steps: Input should be greater than 0 (got -5)"),
        ("train.stepz=5", "train.stepz: unknown key"),
        ("nosuch.key=1", "nosuch: unknown key"),
        ("parallel.dp=fsdp", "parallel.dp: replaced by parallel.dp_replicate and parallel.dp_shard"),
        ("parallel.dp_shard=0", "parallel.dp_shard: must be a positive number of processes or -1"),
        ("parallel.tp=0", "parallel.tp: Input should be greater than 0"),
        ("train.steps=many", "train.steps: Input should be a valid integer"),
        ("optim.lr=0", "optim.lr: Input should be greater than 0"),
        ("steps", "expected KEY=VALUE"),
        ("steps=3", "the key must be SECTION.NAME"),
        ("train.steps.x=1", "train.steps is a value, not a section"),
    ],
)
def test_bad_value_or_key_names_the_key_in_one_line(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.toml", [override])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_malformed_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML: .*line 2"):
        load_config(bad)


def test_dump_toml_leaves_out_unset_values():
    assert dump_toml({"run": {"name": "x", "dir": None}}) == '[run]\nname = "x"\n'


@pytest.mark.parametrize("key", ["sources", "tokenizer", "vocab_size", "workers", "bad_input", "dedup_exact", "pii"])
def test_a_preparation_key_left_under_data_says_where_it_moved(key, tmp_path):
    config = tmp_path / "old.toml"
    config.write_text(f'[data]\ndataset = "d"\n{key} = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == f"{config}: data.{key}: moved to [prepare] (prepare.{key}); put it under [prepare]"


def test_an_old_config_with_data_sources_is_one_line_and_exit_2_for_prepare_and_train(tmp_path):
    config = tmp_path / "old.toml"
    config.write_text('[data]\ndataset = "d"\nsources = ["raw/*.txt"]\nvocab_size = 300\n')
    for command in ("data prepare", "train"):
        result = run_keel(*command.split(), str(config), cwd=tmp_path)
        assert_one_line_error(result, "data.sources: moved to [prepare] (prepare.sources)")
    assert not (tmp_path / "d").exists()


def test_a_run_dirs_config_from_before_prepare_existed_still_loads(tmp_path):
    # A resolved config.toml of an earlier run (data.manifest_sha256 set at its start), with the old [data] keys.
    config = tmp_path / "config.toml"
    config.write_text('[data]\ndataset = "/d"\nmanifest_sha256 = "ab12"\nsources = ["x/*.txt"]\nvocab_size = 300\n')
    cfg = load_config(config)
    assert cfg.prepare.sources == ["x/*.txt"] and cfg.prepare.vocab_size == 300
    assert cfg.data.dataset == "/d" and cfg.data.manifest_sha256 == "ab12"


def test_every_config_key_has_a_one_line_doc():
    rows = describe_keys()
    card = {"card.license", "card.intended_use", "card.limitations"}
    assert card | {"observe.price_per_device_hour", "observe.grid_gco2_per_kwh"} <= {key for key, _, _ in rows}
    assert [key for key, _, doc in rows if not doc or "\n" in doc] == []
