"""train.precision = "auto": bf16 autocast on CPU only where a start-up probe measures bf16 matmuls clearly faster."""

from __future__ import annotations

import json

import torch

from conftest import run_keel, tiny_config
from keel.config_toml import load_config
from keel.train.precision import BF16_MARGIN, choose_cpu_precision, cpu_matmul_flops, resolve_precision


def test_bf16_is_chosen_only_at_the_margin():
    assert choose_cpu_precision(100e9, BF16_MARGIN * 100e9).dtype == torch.bfloat16
    assert choose_cpu_precision(100e9, 0.99 * BF16_MARGIN * 100e9).dtype == torch.float32
    slow = choose_cpu_precision(164e9, 0.9e9)  # a CPU without bf16 kernels
    assert slow.dtype == torch.float32 and "bf16 matmul 0.9 GFLOP/s, fp32 164.0" in slow.reason


def test_the_probe_measures_once_per_process():
    first = cpu_matmul_flops()
    assert all(flops > 1e8 for flops in first)
    assert cpu_matmul_flops() is first


def test_explicit_precision_is_kept_and_cuda_auto_is_bf16():
    cfg = load_config(None, ["train.precision='fp32'"])
    assert resolve_precision(cfg, torch.device("cpu")).dtype == torch.float32
    cfg = load_config(None, ["train.precision='bf16'"])
    assert resolve_precision(cfg, torch.device("cpu")).dtype == torch.bfloat16
    cfg = load_config(None, ["train.precision='auto'"])
    assert resolve_precision(cfg, torch.device("cuda")).dtype == torch.bfloat16


def test_an_auto_run_logs_its_choice_with_the_figures_and_all_ranks_agree(tmp_path, dataset):
    nproc = 2
    config = tiny_config(
        tmp_path / "c.toml", dataset, train={"steps": 2, "precision": "auto"}, parallel={"nproc": nproc}
    )
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    lines = [
        next(x for x in (run / "logs" / f"rank{r}.log").read_text().splitlines() if "precision: auto:" in x)
        for r in range(nproc)
    ]
    assert all("GFLOP/s" in line and f"{BF16_MARGIN}x" in line for line in lines)
    # Every rank took the same (the slowest rank's) figures, so the same precision.
    assert len({line.split("precision: ")[1] for line in lines}) == 1
    chosen = "bf16" if "bf16 autocast" in lines[0] else "fp32"
    starts = [e for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert [e["precision"] for e in starts] == [chosen] * len(starts) and starts
