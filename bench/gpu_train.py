"""Tokens/s and MFU of `keel train` on one CUDA GPU: GPT-2-124M- and Llama-1B-shaped models, bf16 and compile.

    python bench/gpu_train.py --out DIR [--steps 30] [--only NAME,...] [--timeout S]

Each run is a real `keel train` (preflight, loader, callbacks, checkpoint at the end) on a dataset prepared from
the interpreter's standard library. Prints, per run, the median tokens/s and MFU over the logged steps after the
first third (compilation and warm-up left out), the peak CUDA memory, and MFU against the bf16 matmul ceiling
measured in the same process (an 8192-cube product), beside the datasheet peak the run's `mfu` metric uses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import stdlib_dataset

from keel.observe.mfu import peak_flops

GPT2_124M = {"dim": 768, "n_layers": 12, "n_heads": 12, "max_seq_len": 1024, "tie_embeddings": True}
LLAMA_1B = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192, "max_seq_len": 2048}
RUNS = {  # name: (model, seq_len, global batch, extra overrides)
    "gpt2-124m": (GPT2_124M, 1024, 32, {}),
    "gpt2-124m-eager": (GPT2_124M, 1024, 32, {"train.compile": False}),
    "llama-1b": (LLAMA_1B, 2048, 8, {}),
    "llama-1b-fp8": (LLAMA_1B, 2048, 8, {"train.fp8": True}),
    "llama-1b-eager": (LLAMA_1B, 2048, 8, {"train.compile": False}),
}


def matmul_ceiling(size: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of a square matmul on this GPU: the ceiling MFU is also quoted against."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def run(name: str, dataset: Path, out: Path, steps: int, timeout: float) -> dict:
    model, seq_len, batch, extra = RUNS[name]
    settings = {
        **{f"model.{k}": v for k, v in model.items()},
        "data.dataset": str(dataset),
        "run.dir": str(out / name),
        "train.steps": steps,
        "train.seq_len": seq_len,
        "train.global_batch_size": batch,
        "train.eval_every": 0,
        "train.precision": "bf16",
        "train.device": "cuda",
        "train.compile": True,
        "checkpoint.every": 0,
        "observe.console": False,
        "observe.tensorboard": False,
        **extra,
    }
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    started = time.perf_counter()
    config = out / "empty.toml"  # every setting comes from the overrides
    config.write_text("")
    command = [sys.executable, "-m", "keel", "train", str(config), *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"still running after {timeout} s"}
    wall = time.perf_counter() - started
    if done.returncode:
        return {"name": name, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    shutil.rmtree(out / name / "checkpoints", ignore_errors=True)  # a 1B run's final save is 12 GB of disk
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > steps // 3]
    return {
        "name": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed),
        "memory_cuda_peak_gb": max(r.get("memory_cuda_peak_gb", 0.0) for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "power_w": statistics.median(r.get("power_w", 0.0) for r in timed),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    ceiling, datasheet = matmul_ceiling(), peak_flops(torch.device("cuda", 0), torch.bfloat16)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    print(f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s, datasheet {(datasheet or 0) / 1e12:.0f}")
    dataset = stdlib_dataset(opts.out)
    results = []
    for name in opts.only.split(","):
        result = run(name, dataset, opts.out, opts.steps, opts.timeout)
        if "mfu" in result and datasheet:  # the run's MFU is over the datasheet peak; the same FLOP/s over the ceiling
            result["mfu_of_ceiling"] = result["mfu"] * datasheet / ceiling
        results.append(result)
        print(json.dumps(result), flush=True)
        (opts.out / "results.json").write_text(json.dumps({"device": props.name, "ceiling": ceiling, "runs": results}))


if __name__ == "__main__":
    main()
