"""Python scalars in state dicts travel as tensors, so DCP never pickles (invariant 7)."""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}


def to_tensors(state: Any) -> Any:
    """Copy a nested state dict with every bool, int and float leaf turned into a 0-d tensor."""
    if isinstance(state, dict):
        return {k: to_tensors(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return state
    if type(state) in _DTYPES:
        return torch.tensor(state, dtype=_DTYPES[type(state)])
    raise TypeError(f"checkpoint state may hold tensors, bools, ints and floats, not {type(state).__name__}")


def from_tensors(loaded: Any, like: Any) -> Any:
    """Turn the tensor leaves of `loaded` back into Python scalars wherever `like` holds a scalar."""
    if isinstance(like, dict):
        return {k: from_tensors(loaded[k], v) for k, v in like.items()}
    if isinstance(like, torch.Tensor):
        return loaded
    return type(like)(loaded.item())
