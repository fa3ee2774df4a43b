"""The optimizer: the warm-up + cosine schedule, weight decay on matrices only, and gradient clipping, as trained."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import losses, read_metrics, run_keel, tiny_config
from keel.config import OptimConfig
from keel.config_toml import load_config
from keel.distributed.grads import clip_grads, grad_norm, norm_value
from keel.models import model_args
from keel.rundir import RunDir
from keel.train.optim import build_optimizer, lr_at

LR, FLOOR_RATIO, WARMUP, STEPS = 1e-3, 0.1, 10, 110  # 100 decay steps: the half is at step 60
FLOOR = LR * FLOOR_RATIO


def schedule(warmup_steps: int = WARMUP) -> OptimConfig:
    return OptimConfig(lr=LR, min_lr_ratio=FLOOR_RATIO, warmup_steps=warmup_steps)


def train(tmp_path, dataset, name: str, **sections) -> RunDir:
    """A short real `keel train` run of the tiny model; its run dir."""
    config = tiny_config(tmp_path / f"{name}.toml", dataset, run={"name": name, "seed": 0}, **sections)
    result = run_keel("train", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return RunDir(tmp_path / "runs" / name)


# The learning-rate schedule.


def test_warmup_rises_linearly_to_the_peak_exactly_at_warmup_steps():
    cfg = schedule()
    for step in range(1, WARMUP + 1):
        assert lr_at(step, cfg, STEPS) == pytest.approx(LR * step / WARMUP, rel=1e-12)
    assert lr_at(WARMUP, cfg, STEPS) == LR


def test_decay_follows_the_cosine_down_to_the_floor_and_stays_there():
    cfg = schedule()
    decay = STEPS - WARMUP
    # Half-way, the cosine is half-way between peak and floor; at a quarter it is (2 + sqrt 2) / 4 of the way up
    # (a linear decay would be 3/4 there).
    assert lr_at(WARMUP + decay // 2, cfg, STEPS) == pytest.approx(FLOOR + (LR - FLOOR) / 2, rel=1e-12)
    quarter = FLOOR + (LR - FLOOR) * (2 + math.sqrt(2)) / 4
    assert lr_at(WARMUP + decay // 4, cfg, STEPS) == pytest.approx(quarter, rel=1e-12)
    for step in range(WARMUP + 1, STEPS + 1):
        expected = FLOOR + (LR - FLOOR) * (1 + math.cos(math.pi * (step - WARMUP) / decay)) / 2
        assert lr_at(step, cfg, STEPS) == pytest.approx(expected, rel=1e-12)
    assert lr_at(STEPS, cfg, STEPS) == pytest.approx(FLOOR, rel=1e-12)
    for step in (STEPS + 1, STEPS + 50, 10 * STEPS):
        assert lr_at(step, cfg, STEPS) == pytest.approx(FLOOR, rel=1e-12)


def test_lr_never_rises_after_warmup():
    cfg = schedule()
    rates = [lr_at(step, cfg, STEPS) for step in range(WARMUP, STEPS + 20)]
    assert all(later <= earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[0] > rates[-1]


def test_no_warmup_starts_at_the_peak():
    cfg = schedule(warmup_steps=0)
    assert lr_at(0, cfg, STEPS) == LR  # the curve's start; step 1 is already one cosine step down it
    assert lr_at(1, cfg, STEPS) == pytest.approx(FLOOR + (LR - FLOOR) * (1 + math.cos(math.pi / STEPS)) / 2)
    assert lr_at(1, cfg, STEPS) > 0.999 * LR
    assert lr_at(STEPS // 2, cfg, STEPS) == pytest.approx(FLOOR + (LR - FLOOR) / 2, rel=1e-12)
    assert lr_at(STEPS, cfg, STEPS) == pytest.approx(FLOOR, rel=1e-12)


def test_trainer_applies_the_schedule_at_every_step(tmp_path, dataset):
    steps = 8
    run = train(tmp_path, dataset, "lr", train={"steps": steps}, optim={"lr": 1e-2, "warmup_steps": 3})
    cfg = load_config(run.config)
    recorded = {r["step"]: r["lr"] for r in read_metrics(run.root) if "lr" in r}
    assert sorted(recorded) == list(range(1, steps + 1))
    for step, lr in recorded.items():
        assert lr == lr_at(step, cfg.optim, steps), f"step {step}"
    assert recorded[1] < recorded[3] == 1e-2 and recorded[steps] == pytest.approx(1e-3)


# Weight decay.

LAYERS = 2
MATRICES = {"tok_embeddings.weight", "output.weight"} | {
    f"layers.{i}.{name}.weight"
    for i in range(LAYERS)
    for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
    + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
}
NORMS = {"norm.weight"} | {
    f"layers.{i}.{name}.weight" for i in range(LAYERS) for name in ("attention_norm", "ffn_norm")
}


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    spec, args = model_args({"name": "llama", "dim": 64, "n_layers": LAYERS, "n_heads": 4, "vocab_size": 128})
    return spec.build(args)


def test_decay_group_holds_the_matrices_and_the_other_the_norms():
    model = llama()
    names = {id(p): name for name, p in model.named_parameters()}
    assert set(names.values()) == MATRICES | NORMS
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == MATRICES
    assert {names[id(p)] for p in no_decay["params"]} == NORMS
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(names)  # every parameter exactly once


def test_one_step_with_zero_gradients_shrinks_matrices_by_lr_times_wd_and_leaves_norms():
    lr, wd = 0.1, 0.5
    model = llama()
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["norm.weight"].uniform_(0.5, 1.5)  # not all ones, so any shrinkage shows
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=wd), torch.device("cpu"))
    for p in params.values():
        p.grad = torch.zeros_like(p)  # Adam's own update is then 0: only the decay moves a weight
    optimizer.step()
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight"):
        torch.testing.assert_close(params[name].detach(), before[name] * (1 - lr * wd), rtol=1e-6, atol=0)
    for name in NORMS:
        assert torch.equal(params[name].detach(), before[name]), name


# Gradient clipping.


def backward_with_a_large_loss(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of 1000 x the next-token loss on random tokens; a copy of them."""
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    loss = 1000 * F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def clip_grad_norm(model, max_norm: float) -> float:
    """What the trainer does: measure the global norm, clip to it, return the norm before clipping."""
    norm = grad_norm(model)
    clip_grads(model, max_norm, norm)
    return norm_value(norm)


def global_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])))


def test_clipping_scales_every_gradient_to_the_max_norm_and_returns_the_norm_before():
    model = llama()
    before = backward_with_a_large_loss(model)
    norm = global_norm(before.values())
    assert norm > 10
    returned = clip_grad_norm(model, 1.0)
    assert returned == pytest.approx(norm, rel=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert global_norm(grads.values()) == pytest.approx(1.0, abs=1e-5)
    for name, grad in grads.items():  # one factor for all: the direction is unchanged
        torch.testing.assert_close(grad, before[name] / norm, rtol=1e-4, atol=1e-12)


def test_max_norm_zero_only_measures():
    model = llama()
    before = backward_with_a_large_loss(model)
    assert clip_grad_norm(model, 0) == pytest.approx(global_norm(before.values()), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), name


def test_trainer_clips_with_train_grad_clip(tmp_path, dataset):
    optim = {"lr": 3e-2, "warmup_steps": 0}
    free = train(tmp_path, dataset, "free", train={"grad_clip": 0}, optim=optim)
    clipped = train(tmp_path, dataset, "clipped", train={"grad_clip": 1e-3}, optim=optim)
    free_records, clipped_records = read_metrics(free.root), read_metrics(clipped.root)
    # The norm recorded is the one before clipping: the same gradients give the same norm, far above the clip.
    assert clipped_records[0]["grad_norm"] == pytest.approx(free_records[0]["grad_norm"], rel=1e-6)
    assert clipped_records[0]["grad_norm"] > 100 * 1e-3
    free_losses, clipped_losses = losses(free.root), losses(clipped.root)
    assert clipped_losses[0] == pytest.approx(free_losses[0], rel=1e-6)  # before the first update
    for step, (a, b) in enumerate(zip(free_losses[1:], clipped_losses[1:], strict=True), start=2):
        assert abs(a - b) > 1e-3, f"step {step}: {a} vs {b}"
