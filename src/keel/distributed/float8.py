"""float8 training (`train.fp8`): the model's linear layers swapped for torchao's Float8Linear from outside the model.

Float8Linear keeps its weight in the model's precision and casts the input, the weight and the output gradient to
float8 (tensor-wise dynamic scales) for each matmul (`torch._scaled_mm`); its parameter names are nn.Linear's, so a
checkpoint trained with fp8 loads without it and the other way round. Applied before tensor parallel, activation
checkpointing, compile and FSDP2, as torchtitan's float8 converter does. It runs on CPU too (torch 2.13 has float8
`_scaled_mm` kernels there), which is how it is tested.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

# torch._scaled_mm's float8 kernels on CUDA need Ada or Hopper (compute capability 8.9) or newer; CPU has them.
MIN_CUDA_CAPABILITY = (8, 9)
# The float8 matmul kernels take dimensions that are multiples of 16; torchtitan leaves smaller or odd layers alone.
DIM_MULTIPLE = 16


def fp8_problem(device: str, tp: int) -> str | None:
    """Why `train.fp8` cannot run here (one line naming what to change), or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "train.fp8: needs torchao (pip install torchao, pinned in requirements.txt) or set train.fp8=false"
    if tp > 1:
        return (
            "train.fp8: not combined with tensor parallel (float8 needs its own tensor-parallel plan); "
            "set parallel.tp=1 or train.fp8=false"
        )
    if device != "cpu" and torch.cuda.is_available():  # auto and cuda train on the GPUs
        capability = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        if capability < MIN_CUDA_CAPABILITY:
            return (
                f"train.fp8: float8 matmuls need a GPU of compute capability 8.9 or newer (H100, L4, ...), this one "
                f"is {capability[0]}.{capability[1]}; set train.fp8=false"
            )
    return None


def convert_to_float8(model: nn.Module, keep: tuple[str, ...]) -> list[str]:
    """Swap the model's nn.Linear layers for Float8Linear in place, except those named in `keep` and those whose
    dimensions are not multiples of 16; returns the names of the layers swapped."""
    # Its import warns about each CUDA-only kernel library it cannot load, on every CPU process.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.float8 import convert_to_float8_training  # only when asked: it loads kernels
    from torchao.float8.float8_linear import Float8Linear

    def wanted(linear: nn.Module, name: str) -> bool:
        dims = (linear.in_features, linear.out_features)
        return name not in keep and all(d % DIM_MULTIPLE == 0 for d in dims)

    convert_to_float8_training(model, module_filter_fn=wanted)
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
