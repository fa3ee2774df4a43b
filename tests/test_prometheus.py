"""A real Prometheus server scrapes a running 2-process job and returns its metrics; promtool accepts our files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, tiny_config
from keel.observe.metrics import FAMILIES, UNITS

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="session")
def prometheus() -> str:
    """The Prometheus binary, installed from Debian's packages by the test set-up when missing."""
    if shutil.which("prometheus") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
            subprocess.run(install, env=env, check=True, capture_output=True)
    return shutil.which("prometheus")


def free_ports(count: int) -> int:
    """A base port such that base .. base+count-1 are all free on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            held = []
            for port in range(base, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no free ports")


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def test_promtool_accepts_the_scrape_config_and_alert_rules(prometheus):
    promtool = str(Path(prometheus).with_name("promtool"))
    for args in (
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_plots_only_metrics_the_hub_exports():
    dashboard = json.loads((DEPLOY / "grafana" / "keel-dashboard.json").read_text())
    exported = {f"keel_{name}" for name in UNITS} | {f"keel_{family}_group" for family in FAMILIES}
    exported |= {"keel_step", "keel_last_update_timestamp_seconds"}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = {word for word in target["expr"].replace("{", " ").split() if word.startswith("keel_")}
            assert names and names <= exported, (panel["title"], names - exported)


def test_prometheus_scrapes_loss_and_throughput_of_a_two_process_run(tmp_path, dataset, prometheus):
    exporters, server = free_ports(2), free_ports(1)
    config = tiny_config(
        tmp_path / "c.toml",
        dataset,
        train={"steps": 100000},
        parallel={"nproc": 2, "dp_replicate": -1, "dp_shard": 1},
        observe={"prometheus": True, "prometheus_port": exporters, "console": False},
    )
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: keel\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporters}', '127.0.0.1:{exporters + 1}']\n"
    )
    training = subprocess.Popen(
        [sys.executable, "-m", "keel", "train", str(config)],
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    scraper = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{server}",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline, loss, speed = time.time() + 120, [], []
        while time.time() < deadline and (len(loss) < 2 or len(speed) < 2):
            assert training.poll() is None, "training ended before Prometheus scraped it"
            time.sleep(1)
            try:
                loss, speed = query(server, "keel_loss"), query(server, "keel_tokens_per_s")
            except OSError:
                continue  # the server is still starting
        assert sorted(r["metric"]["rank"] for r in loss) == ["0", "1"]
        assert all(r["metric"]["run"] == "tiny" for r in loss)
        assert all(0 < float(r["value"][1]) < 20 for r in loss)
        assert all(float(r["value"][1]) > 0 for r in speed)
    finally:
        for proc in (training, scraper):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # torchrun puts workers in sessions of their own; they must still die with the job, not linger as orphans.
    deadline = time.time() + 20
    while time.time() < deadline and workers_of(tmp_path):
        time.sleep(0.2)
    assert not workers_of(tmp_path)


def workers_of(run_root: Path) -> list[psutil.Process]:
    """Live training workers whose command line names a run under `run_root`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "keel.train.worker" in cmdline and str(run_root) in cmdline:
            found.append(proc)
    return found
