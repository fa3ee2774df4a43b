"""The metrics hub and its sinks: names are checked, the heartbeat is paced, W&B receives what the hub records."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_keel, tiny_config
from keel.observe.heartbeat import StatusSink, read_status
from keel.observe.metrics import Metrics, unit_of


class Collect:
    def __init__(self):
        self.records = []

    def write(self, step, time, values):
        self.records.append((step, values))

    def close(self):
        pass


def test_hub_accepts_known_names_and_family_members_and_rejects_the_rest():
    sink = Collect()
    hub = Metrics([sink])
    hub.record(3, {"loss": 2.5, "grad_norm/layers.attention.wq": 0.1})
    assert sink.records == [(3, {"loss": 2.5, "grad_norm/layers.attention.wq": 0.1})]
    assert unit_of("grad_norm/output") == "1" and unit_of("tokens_per_s_rank") == "tokens/s"
    for bad in ("losss", "grad_norm/", "nope/x"):
        with pytest.raises(KeyError, match="unknown metric"):
            hub.record(4, {bad: 1.0})
    assert len(sink.records) == 1  # a rejected record reaches no sink


def test_heartbeat_is_rewritten_at_most_once_per_interval_and_flushed_on_close(tmp_path):
    sink = StatusSink(tmp_path, total_steps=10, interval_s=3600)
    assert read_status(tmp_path)["state"] == "starting"
    sink.write(1, 0.0, {"loss": 5.0})  # the first record always beats: the run is now running
    assert read_status(tmp_path)["step"] == 1
    sink.write(2, 0.0, {"loss": 4.0})
    assert read_status(tmp_path)["step"] == 1  # within the interval: no rewrite on the step's path
    sink.close()
    assert read_status(tmp_path)["step"] == 2 and read_status(tmp_path)["loss"] == 4.0
    (tmp_path / "x").mkdir()
    every = StatusSink(tmp_path / "x", total_steps=10, interval_s=0)
    for step in (1, 2):
        every.write(step, 0.0, {"loss": 1.0})
        assert read_status(tmp_path / "x")["step"] == step


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of a W&B offline run file: a LevelDB-style record log of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    rows, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # a block's tail too short for a header is padding
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_sink_logs_the_hubs_metrics_to_an_offline_run(tmp_path, dataset, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 3}, observe={"wandb": True})
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_files = list((tmp_path / "runs" / "tiny" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = [r for r in wandb_history(run_files[0]) if "loss" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert all("grad_norm/output" in r and r["tokens_per_s"] > 0 for r in rows)


def test_wandb_on_without_the_package_is_a_one_line_error(tmp_path, dataset, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "wandb.py").write_text("raise ImportError('no wandb here')\n")  # shadows the installed package
    monkeypatch.setenv("PYTHONPATH", str(site))
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 1}, observe={"wandb": True})
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "keel: error: observe.wandb is on but the wandb package is not installed; `pip install wandb` or set "
        "observe.wandb=false"
    ]


def test_wandb_on_without_a_login_is_a_one_line_error_before_the_run_starts(tmp_path, dataset, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 1}, observe={"wandb": True})
    result = run_keel("train", str(config), cwd=tmp_path)
    assert_one_line_error(result, "observe.wandb: no W&B login", "wandb login", "WANDB_API_KEY", "WANDB_MODE=offline")
    assert not (tmp_path / "runs").exists()
