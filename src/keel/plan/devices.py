"""The devices a plan can be for: memory, peak FLOP/s, rated power, link bandwidths, and the MFU to expect.

GPU figures are data-sheet values (peaks from keel.observe.mfu; memory as torch reports it); the CPU is this machine,
measured when the plan is made. The expected MFU comes from measured Keel runs on that device where there are some
(docs/benchmarks.md), else from published runs, and the plan says which.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace

import psutil
import torch

from keel.observe.mfu import A100, H100_SXM, H200_SXM, Accelerator, dtype_peak, identify
from keel.observe.power import GPU_WATTS, cpu_model, rated_cpu

MIB = 2**20
# A CPU training process's resident memory settles, after a few steps, above its framework and its tensors' peak by
# about 0.2 GB and a tenth of the tensors: glibc's malloc keeps freed blocks below its mmap threshold (which rises
# with use, up to 32 MiB) in its heaps, one per thread that allocates, and they do not shrink past blocks still live.
# Measured 0.21-0.23 GB at 0.28-0.68 GB of tensors and 0.43 GB at 1.64 GB, after 12 steps of the four configs of
# bench/plan_accuracy.py (docs/plan.md); this puts the plan within 5% of all four.
GLIBC_HEAP = (0.2e9, 0.1)


@dataclass(frozen=True)
class Expected:
    """The MFU to expect on a device, the activation checkpointing of the runs it comes from, and where it is from."""

    mfu: float
    checkpointing: str  # none, selective (per op: no recomputed matmuls) or full
    source: str
    measured: bool  # a Keel run on this device (True) or a published figure (False)
    eager_mfu: float | None = None  # the same runs without torch.compile, where measured; None: compile makes no odds


@dataclass(frozen=True)
class Device:
    """What a plan needs to know about one device (a GPU, or a CPU process's share of the machine)."""

    kind: str  # h100, h200, a100, cpu
    name: str
    memory: float  # bytes one process may use
    bf16: float  # peak FLOP/s of bf16 matmuls (the CPU: of fp32, which is what it trains in)
    fp32: float  # peak FLOP/s of fp32 matmuls
    watts: float  # rated power of the device (the CPU: this process's share)
    framework: float  # bytes a process holds before the model: CUDA context and NCCL, or measured RSS
    intra_node: float  # bytes/s one device sends to another in its machine (NVLink; a CPU's memory via gloo)
    inter_node: float  # bytes/s one device sends to another machine
    expected: Expected
    allocator: tuple[float, float] = (0.0, 0.0)  # what the allocator keeps beyond live tensors: bytes, and a share
    auto_precision: str = "autocast"  # what train.precision = "auto" trains in here: autocast (bf16) or fp32

    @property
    def kernels(self) -> str:
        """The torch device type whose kernels the run uses: cpu or cuda."""
        return "cpu" if self.kind == "cpu" else "cuda"

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of matmuls in the precision a run computes in."""
        return self.fp32 if precision == "fp32" else self.bf16


# Published figures, not measured by Keel: torchtitan's Llama 3 runs.
TORCHTITAN_H100 = Expected(
    0.39,
    "selective",
    "assumed: torchtitan's Llama 3.1 8B with FSDP on 8 H100s without Float8, 33-39% "
    "(pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md); no Keel run on this GPU yet",
    measured=False,
)
TORCHTITAN_A100 = Expected(
    0.58,
    "selective",
    "assumed: torchtitan's Llama 3 8B with FSDP on 64 A100s, per-op selective checkpointing, 58.2% "
    "(pytorch/torchtitan docs/performance.md); no Keel run on this GPU yet",
    measured=False,
)
# Measured: bench/gpu_train.py, docs/benchmarks.md "GPU" (a Llama 1B shape, seq 2048, batch 8, one H200, bf16,
# 2026-11-26): 50.9% with torch.compile per block, 40.0% eager. The H100 has the same SMs and peak (slower memory).
KEEL_H200 = Expected(
    0.509,
    "none",
    "measured: Keel's trainer, Llama 1B shape, bf16 + torch.compile, one H200 (docs/benchmarks.md, GPU); "
    "40.0% without compile",
    measured=True,
    eager_mfu=0.400,
)
# Measured: bench/train_throughput.py, docs/benchmarks.md "Training throughput" (2-core EPYC, fp32, one process,
# 2 threads, the fused loss and fused AdamW; 2026-11-25, idle machine).
CPU_MEASURED = Expected(
    0.68,
    "none",
    "measured: Keel's trainer on the benchmark Llama, fp32, one process of 2 threads (docs/benchmarks.md, "
    "Training throughput)",
    measured=True,
)
GIB = 2**30
CUDA_FRAMEWORK = 1.5 * GIB  # CUDA context, cuBLAS workspaces and NCCL buffers; assumed (not measured: no GPU here)
NVLINK4 = 450e9  # bytes/s each way per H100/H200 SXM (900 GB/s bidirectional)
NVLINK3 = 300e9  # A100 SXM
INFINIBAND = 50e9  # 400 Gb/s per GPU, the usual fabric of such clusters


def _gpu(kind: str, acc: Accelerator, memory_mib: int, watts: float, link: float, expected: Expected) -> Device:
    bf16, fp32 = dtype_peak(acc, torch.bfloat16, False), dtype_peak(acc, torch.float32, False)
    return Device(kind, acc.name, memory_mib * MIB, bf16, fp32, watts, CUDA_FRAMEWORK, link, INFINIBAND, expected)


# Memory as nvidia-smi reports the card (torch's total_memory); power is the board's rated maximum (the energy
# meter's table).
GPUS = {
    "h100": _gpu("h100", H100_SXM, 81559, GPU_WATTS["H100 SXM"], NVLINK4, TORCHTITAN_H100),
    "h200": _gpu("h200", H200_SXM, 143771, GPU_WATTS["H200 SXM"], NVLINK4, KEEL_H200),
    "a100": _gpu("a100", replace(A100, name="A100 SXM 80GB"), 81920, GPU_WATTS["A100 SXM"], NVLINK3, TORCHTITAN_A100),
}
KINDS = (*GPUS, "cpu")


def cpu_device(processes: int, framework: float, fp32: float, bf16: float, auto_precision: str) -> Device:
    """This machine's CPU shared by `processes` training processes.

    `framework` is the resident memory of a process that has loaded what a training process loads; `fp32`, `bf16`
    the matmul FLOP/s of one process with its share of the cores; `auto_precision` what train.precision = "auto"
    picks here (all measured by the caller).
    """
    share = 1 / processes
    watts = rated_cpu(cpu_model(), max(1, (os.cpu_count() or 1) // processes)).watts
    memory = psutil.virtual_memory().total * share
    heap = GLIBC_HEAP if platform.libc_ver()[0] == "glibc" else (0.0, 0.0)
    # One machine: processes exchange tensors through gloo over loopback, at about a memory copy's speed.
    link = 2e9
    return Device("cpu", "CPU", memory, bf16, fp32, watts, framework, link, link, CPU_MEASURED, heap, auto_precision)


def cuda_device() -> Device | None:
    """The visible CUDA GPU, if its family is one the plan knows (None otherwise): the family's links and expected
    MFU, with the variant's own peak, board power (keel.observe.mfu.identify) and the memory torch sees (a MIG
    slice's, say)."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return gpu_device(props.name, props.multi_processor_count, props.total_memory)


def gpu_device(name: str, sms: int, memory_bytes: int) -> Device | None:
    """The Device of a GPU named as torch names it; None if it is not of a family the plan knows."""
    acc = identify(name, sms, memory_bytes)
    family = next((kind for kind in ("h200", "h100", "a100") if acc and kind.upper() in acc.name.upper()), None)
    if family is None:
        return None
    bf16, fp32 = dtype_peak(acc, torch.bfloat16, False), dtype_peak(acc, torch.float32, False)
    if "MIG" in name.upper().split():  # a slice computes with its share of the SMs
        bf16, fp32 = (peak * min(1.0, sms / acc.sms) for peak in (bf16, fp32))
    watts = next((w for fragment, w in GPU_WATTS.items() if fragment in acc.name), GPUS[family].watts)
    return replace(GPUS[family], name=acc.name, memory=float(memory_bytes), bf16=bf16, fp32=fp32, watts=watts)
