"""Model FLOPs utilisation: achieved FLOP/s against the device's peak (a table on CUDA, measured on CPU)."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, from the vendors' data sheets.
CUDA_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def cuda_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a CUDA device from the table, or None if it is not listed."""
    name = torch.cuda.get_device_name(device)
    for fragment, peak in CUDA_BF16_PEAK.items():
        if fragment in name:
            return peak
    return None


def measured_matmul_flops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a square matmul on the CPU with this process's threads: the ceiling MFU is measured against."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first call pays for kernel selection
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The per-device peak used for MFU."""
    if device.type == "cuda":
        return cuda_peak_flops(device)
    return measured_matmul_flops(dtype)
