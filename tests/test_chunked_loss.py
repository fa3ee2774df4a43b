"""The chunked cross-entropy fused with the output projection: the plain path's loss and gradients, not its logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_MODEL
from keel.models import model_args
from keel.models.chunked_loss import linear_cross_entropy
from keel.models.loss import next_token_loss

TOKENS, DIM, VOCAB = 300, 32, 1000  # 300 tokens: the last chunk of 64 is a partial one


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, DIM, generator=g, requires_grad=True)
    weight = (torch.randn(VOCAB, DIM, generator=g) * 0.1).requires_grad_()
    return hidden, weight, torch.randint(0, VOCAB, (TOKENS,), generator=g)


def loss_and_grads(fn, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def chunked(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return linear_cross_entropy(hidden, weight, targets, chunk=64)


@pytest.mark.parametrize("bf16, rtol", [(False, 1e-5), (True, 2e-2)])
def test_loss_and_gradients_equal_the_plain_path(bf16, rtol):
    expected, got = loss_and_grads(plain, bf16), loss_and_grads(chunked, bf16)
    assert got[0].dtype == torch.float32
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == e.dtype
        # Relative to the largest entry: gradients hold near-zero entries whose relative error means nothing.
        assert (g - e).abs().max() <= rtol * e.abs().max(), (g - e).abs().max() / e.abs().max()
    if not bf16:
        assert got[0] == pytest.approx(expected[0].item(), rel=1e-6)


def test_without_gradients_it_gives_the_same_loss():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        assert chunked(hidden, weight, targets) == pytest.approx(plain(hidden, weight, targets).item(), rel=1e-6)


def test_no_tensor_as_large_as_the_logits_is_made():
    def largest(fn) -> int:
        hidden, weight, targets = inputs()
        with LargestTensor() as mode:
            fn(hidden, weight, targets).backward()
        return mode.largest

    assert largest(plain) >= TOKENS * VOCAB  # what the check would find on the plain path
    assert largest(chunked) <= 64 * VOCAB  # one chunk's logits at most


def test_the_models_fused_loss_matches_logits_then_loss_for_every_parameter():
    spec, args = model_args({"name": "llama", **TINY_MODEL, "vocab_size": 300, "tie_embeddings": True})
    torch.manual_seed(0)
    model = spec.build(args)
    tokens = torch.randint(0, 300, (4, 33))
    fused = model(tokens[:, :-1], targets=tokens[:, 1:])
    fused.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    reference = next_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
    reference.backward()
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max(), name
