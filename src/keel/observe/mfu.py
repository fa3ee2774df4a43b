"""Model FLOPs utilisation: achieved FLOP/s against the peak for the dtype in use (a table on CUDA, measured on CPU)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Accelerator:
    """A product variant and its dense peaks (FLOP/s, no 2:4 sparsity) from the vendor's data sheet."""

    name: str
    sms: int  # streaming multiprocessors of the whole product; a MIG slice has a share of them
    bf16: float  # tensor cores, FP32 accumulate (fp16 is the same)
    tf32: float  # tensor cores
    fp32: float  # CUDA cores, no tensor cores
    fp8: float | None = None  # tensor cores; Hopper and later


H100_SXM = Accelerator("H100 SXM", 132, bf16=989e12, tf32=495e12, fp32=67e12, fp8=1979e12)
H100_PCIE = Accelerator("H100 PCIe", 114, bf16=756e12, tf32=378e12, fp32=51e12, fp8=1513e12)
H100_NVL = Accelerator("H100 NVL", 132, bf16=835e12, tf32=418e12, fp32=60e12, fp8=1671e12)
H200_SXM = replace(H100_SXM, name="H200 SXM")  # the H100 SXM's chip and clocks with more, faster memory
H200_NVL = replace(H100_NVL, name="H200 NVL")
GH200 = replace(H100_SXM, name="GH200")
# A100 PCIe and SXM, 40 and 80 GB, share the data sheet's peaks; only their power limits differ.
A100 = Accelerator("A100", 108, bf16=312e12, tf32=156e12, fp32=19.5e12)
OTHERS = {
    "L40S": Accelerator("L40S", 142, bf16=362e12, tf32=183e12, fp32=91.6e12, fp8=733e12),
    "A10G": Accelerator("A10G", 80, bf16=125e12, tf32=62.5e12, fp32=31.2e12),  # the A10's data sheet
    "4090": Accelerator("RTX 4090", 128, bf16=165e12, tf32=82.6e12, fp32=82.6e12, fp8=330e12),
}
NVL_MEMORY = 90e9  # bytes: an H100 NVL has 94 GB, the SXM and PCIe cards 80 GB


def identify(name: str, sms: int, memory_bytes: int) -> Accelerator | None:
    """The product variant of a CUDA device from torch's name, SM count and memory in bytes; None if not listed."""
    upper = name.upper()
    if "GH200" in upper:  # before H200, which its name contains
        return GH200
    if "H200" in upper:
        return H200_NVL if "NVL" in upper else H200_SXM
    if "H100" in upper:
        if "NVL" in upper or memory_bytes > NVL_MEMORY:
            return H100_NVL
        # SXM boards are named "H100 80GB HBM3" (or SXM); PCIe cards "H100 PCIe"; a bare "H100" by its SM count.
        if "PCIE" in upper or ("HBM3" not in upper and "SXM" not in upper and sms == H100_PCIE.sms):
            return H100_PCIE
        return H100_SXM
    if "A100" in upper:
        form = "PCIe" if "PCIE" in upper else "SXM"
        return replace(A100, name=f"A100 {form} {80 if memory_bytes > 60e9 else 40}GB")
    return next((acc for fragment, acc in OTHERS.items() if fragment in upper), None)


def dtype_peak(acc: Accelerator, dtype: torch.dtype, tf32: bool) -> float | None:
    """The peak for matmuls in `dtype`: fp32 counts TF32 tensor cores only where PyTorch lets matmuls use them."""
    if dtype in (torch.bfloat16, torch.float16):
        return acc.bf16
    if dtype == torch.float32:
        # PyTorch runs fp32 matmuls in IEEE fp32 on the CUDA cores unless TF32 is allowed (it is not by default,
        # nor by Keel); against the TF32 peak, an fp32 run's MFU would read about 7 times too low.
        return acc.tf32 if tf32 else acc.fp32
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return acc.fp8
    return None


def cuda_peak_flops(name: str, sms: int, memory_bytes: int, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Peak FLOP/s of a CUDA device (or a MIG slice's share) for matmuls in `dtype`; None if it is not listed."""
    acc = identify(name, sms, memory_bytes)
    peak = dtype_peak(acc, dtype, tf32) if acc is not None else None
    if peak is not None and "MIG" in name.upper().split():
        peak *= min(1.0, sms / acc.sms)  # a MIG slice computes with its share of the SMs
    return peak


def tf32_matmuls() -> bool:
    """Whether fp32 CUDA matmuls may run on TF32 tensor cores; PyTorch's default, which Keel keeps, is no."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


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
    """The per-device peak used for MFU, for matmuls in `dtype` (the training precision)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return cuda_peak_flops(props.name, props.multi_processor_count, props.total_memory, dtype, tf32_matmuls())
    return measured_matmul_flops(dtype)
