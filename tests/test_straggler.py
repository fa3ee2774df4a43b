"""Stragglers: a rank slowed on purpose is named, with its host, in events.jsonl and the metrics."""

from __future__ import annotations

import json
import os
import socket
import textwrap

import pytest

from conftest import read_metrics, run_keel, tiny_config
from keel.observe.straggler import rank_slowdowns

# Imported by every Python process that finds it on PYTHONPATH: pins rank 0 to CPU 0, and rank 1 to CPU 1
# beside four busy loops, so rank 1 gets a fraction of a core, as on a node shared with a noisy neighbour.
SLOW_RANK_ONE = textwrap.dedent(
    """
    import os, subprocess, sys
    rank = os.environ.get("RANK")
    if "LOCAL_RANK" in os.environ and rank in ("0", "1"):
        os.sched_setaffinity(0, {int(rank)})
        if rank == "1":
            # -I -S: the busy loops must not import this file again; PR_SET_PDEATHSIG: they die with the rank.
            burn = "import ctypes, os; ctypes.CDLL(None).prctl(1, 9); os.sched_setaffinity(0, {1})\\nwhile True: pass"
            for _ in range(4):
                subprocess.Popen([sys.executable, "-I", "-S", "-c", burn])
    """
)


def test_slowdowns_compare_each_rank_with_the_median_and_name_the_cause():
    probes, waits, steps = [0.010, 0.010, 0.031, 0.011], [0.0, 0.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0]
    slowdowns = rank_slowdowns(probes, waits, steps)
    assert slowdowns[2][0] == pytest.approx(0.031 / 0.0105) and slowdowns[2][1] == "slow device"
    assert slowdowns[3][0] == pytest.approx(1.5) and slowdowns[3][1] == "slow input"
    assert all(s < 1.1 for s, _ in slowdowns[:2])


@pytest.mark.soak  # 26 s; the comparison itself is tested above in-process
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0), reason="needs CPUs 0, 1")
def test_a_rank_slowed_by_a_busy_neighbour_is_named_a_straggler(tmp_path, dataset, monkeypatch):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_RANK_ONE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path / "site"), os.getenv("PYTHONPATH")])))
    config = tiny_config(
        tmp_path / "c.toml",
        dataset,
        train={"steps": 9},
        parallel={"dp_replicate": -1, "dp_shard": 1, "nproc": 2},
        observe={"log_every": 1, "straggler_every": 3, "straggler_margin": 0.2},
    )
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "tiny"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    named = [e for e in events if e["event"] == "straggler"]
    assert {e["rank"] for e in named} == {1}, named
    assert len(named) >= 2 and all(e["rank_host"] == socket.gethostname() for e in named)
    assert all(e["cause"] == "slow device" and e["slowdown"] > 1.2 for e in named)
    checks = [r for r in read_metrics(run) if "stragglers" in r]
    assert [r["step"] for r in checks] == [3, 6, 9]
    assert sum(r["stragglers"] for r in checks) == len(named)
    assert "straggler at step" in result.stderr + result.stdout
    shown = run_keel("status", "runs/tiny", cwd=tmp_path).stdout
    assert "straggler (step=" in shown and "rank=1" in shown and f"rank_host={socket.gethostname()}" in shown
