"""ModelSpec: what Keel needs to know about a model family, so the trainer never has to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything Keel needs to know about a model family, without the trainer knowing it."""

    name: str
    args_cls: type[BaseModel]  # the [model] keys (besides `name`), each with a one-line description
    build: Callable[[Any], nn.Module]  # args -> model with initialised weights (current RNG and default device)
    num_params: Callable[[Any], int]  # closed-form parameter count
    flops_per_token: Callable[[Any, int], float]  # (args, seq_len) -> training FLOPs per token, forward + backward
    shard_units: Callable[[nn.Module], list[nn.Module]]  # submodules FSDP wraps one by one (the blocks)
