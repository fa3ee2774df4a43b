"""MFU's peak: the product variant from torch's device name, SM count and memory; the peak of the dtype in use."""

from __future__ import annotations

import pytest
import torch

from keel.observe.mfu import cuda_peak_flops, identify, peak_flops

MIB = 1 << 20


@pytest.mark.parametrize(
    ("name", "sms", "memory", "variant"),
    [
        ("NVIDIA H100 80GB HBM3", 132, 81559 * MIB, "H100 SXM"),
        ("NVIDIA H100 PCIe", 114, 81559 * MIB, "H100 PCIe"),
        ("NVIDIA H100 NVL", 132, 95830 * MIB, "H100 NVL"),
        ("NVIDIA H100", 114, 81559 * MIB, "H100 PCIe"),  # a bare name: the SM count tells
        ("NVIDIA H100", 132, 81559 * MIB, "H100 SXM"),
        ("NVIDIA H100", 132, 95830 * MIB, "H100 NVL"),  # a bare name: the memory tells
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 40192 * MIB, "H100 SXM"),
        ("NVIDIA H200", 132, 143771 * MIB, "H200 SXM"),
        ("NVIDIA H200 NVL", 132, 143771 * MIB, "H200 NVL"),
        ("NVIDIA GH200 480GB", 132, 97871 * MIB, "GH200"),
        ("NVIDIA A100-SXM4-40GB", 108, 40536 * MIB, "A100 SXM 40GB"),
        ("NVIDIA A100-SXM4-80GB", 108, 81920 * MIB, "A100 SXM 80GB"),
        ("NVIDIA A100-PCIE-40GB", 108, 40536 * MIB, "A100 PCIe 40GB"),
        ("NVIDIA A100 80GB PCIe", 108, 81920 * MIB, "A100 PCIe 80GB"),
    ],
)
def test_the_variant_is_told_by_name_sm_count_and_memory(name, sms, memory, variant):
    assert identify(name, sms, memory).name == variant


@pytest.mark.parametrize(
    ("name", "sms", "memory", "bf16", "fp32", "tf32", "fp8"),
    [
        ("NVIDIA H100 80GB HBM3", 132, 81559 * MIB, 989e12, 67e12, 495e12, 1979e12),
        ("NVIDIA H100 PCIe", 114, 81559 * MIB, 756e12, 51e12, 378e12, 1513e12),
        ("NVIDIA H100 NVL", 132, 95830 * MIB, 835e12, 60e12, 418e12, 1671e12),
        ("NVIDIA H200", 132, 143771 * MIB, 989e12, 67e12, 495e12, 1979e12),
        ("NVIDIA A100-SXM4-80GB", 108, 81920 * MIB, 312e12, 19.5e12, 156e12, None),
    ],
)
def test_the_peak_is_the_dtypes_and_fp32_counts_tf32_only_when_allowed(name, sms, memory, bf16, fp32, tf32, fp8):
    assert cuda_peak_flops(name, sms, memory, torch.bfloat16) == bf16
    assert cuda_peak_flops(name, sms, memory, torch.float32) == fp32
    assert cuda_peak_flops(name, sms, memory, torch.float32, tf32=True) == tf32
    assert cuda_peak_flops(name, sms, memory, torch.float8_e4m3fn) == fp8


def test_a_mig_slice_gets_its_share_and_an_unknown_device_none():
    slice_peak = cuda_peak_flops("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 40192 * MIB, torch.bfloat16)
    assert slice_peak == pytest.approx(989e12 * 60 / 132)
    assert cuda_peak_flops("Some Future GPU", 200, 200 << 30, torch.bfloat16) is None


def test_cpu_measures_the_matmul_ceiling_of_the_dtype_in_use():
    fp32 = peak_flops(torch.device("cpu"), torch.float32)
    assert fp32 is not None and fp32 > 0
