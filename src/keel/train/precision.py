"""The compute precision a run trains in: `train.precision`, where auto on CPU is decided by measuring, not assumed.

A bf16 matmul is ~2x faster than fp32 on a CPU with avx512_bf16 or AMX and ~100x slower on one without, and the
flags /proc/cpuinfo shows do not say which kernels torch's build will pick: so auto times both at start-up.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from keel.config import Config
from keel.distributed.env import all_gather_floats

# bf16 autocast pays for casts and fp32 norms, softmax and loss: its matmuls must be clearly faster to win overall
# (on a 2-core EPYC with avx512_bf16, a matmul speed-up of 1.7-2.4x gave the whole step ~1.4x).
BF16_MARGIN = 1.3
PROBE_SIZE = 512  # the matmul the probe times: about the size of a small model's projections
PROBE_TRIES = 3


@dataclass(frozen=True)
class Precision:
    """The dtype matmuls run in and why it was chosen (for the run's log)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


@functools.cache
def cpu_matmul_flops() -> tuple[float, float]:
    """fp32 and bf16 FLOP/s of a PROBE_SIZE square matmul on this process's threads: the best of a few interleaved
    tries (the least disturbed by other load); measured once per process."""
    a32, b32 = torch.randn(PROBE_SIZE, PROBE_SIZE), torch.randn(PROBE_SIZE, PROBE_SIZE)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    small = torch.ones(64, 64)
    torch.mm(small, small), torch.mm(small.bfloat16(), small.bfloat16())  # kernel selection, outside the timing
    fp32, bf16 = [], []
    for _ in range(PROBE_TRIES):
        fp32.append(_matmul_seconds(a32, b32))
        bf16.append(_matmul_seconds(a16, b16))
        if min(bf16) > 4 * min(fp32):
            break  # no bf16 kernels: more tries would only cost seconds
    flops = 2 * PROBE_SIZE**3
    return flops / min(fp32), flops / min(bf16)


def choose_cpu_precision(fp32_flops: float, bf16_flops: float) -> Precision:
    """bf16 autocast when bf16 matmuls run at least BF16_MARGIN times fp32's FLOP/s, else fp32."""
    speedup = bf16_flops / fp32_flops
    figures = f"bf16 matmul {bf16_flops / 1e9:.1f} GFLOP/s, fp32 {fp32_flops / 1e9:.1f}: {speedup:.2f}x"
    if speedup >= BF16_MARGIN:
        return Precision(torch.bfloat16, f"auto: bf16 autocast ({figures}, at least {BF16_MARGIN}x)")
    return Precision(torch.float32, f"auto: fp32 ({figures}, below {BF16_MARGIN}x)")


def resolve_precision(cfg: Config, device: torch.device) -> Precision:
    """`train.precision` for this run; auto is bf16 on CUDA and, on CPU, what the probe finds faster.

    Every rank probes and all take the slowest rank's figures, so they train in the same precision.
    """
    if cfg.train.precision != "auto":
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        return Precision(dtype, f"train.precision = {cfg.train.precision!r}")
    if device.type == "cuda":
        return Precision(torch.bfloat16, "auto: bf16 autocast on CUDA")
    rows = all_gather_floats(list(cpu_matmul_flops()))
    slowest = min(rows, key=lambda row: row[1] / row[0])
    return choose_cpu_precision(*slowest)
