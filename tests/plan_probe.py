"""Run under torchrun with 2 processes: the plan's memory model against what torch measures, on rank 0.

Prints `saved PRECISION PART MEASURED PLANNED` (bytes per token the tensor-parallel Llama saves, tp = 2) and
`fsdp MODE MEASURED PLANNED` (peak tensor bytes of a training step under FSDP2 over both processes, from torch's
FSDPMemTracker), for tests/test_plan_memory.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from keel.config_toml import build_config
from keel.distributed.env import init_distributed
from keel.distributed.mesh import make_mesh
from keel.distributed.parallel import parallelize
from keel.models import model_args
from keel.plan.memory import Setup, estimate
from keel.train.optim import build_optimizer

BATCH, SEQ = 2, 64
MODEL = {"name": "llama", "dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512}


def saved(precision: str) -> None:
    spec, args = model_args({**MODEL, "max_seq_len": SEQ})
    with torch.device("meta"):
        model = spec.build(args)
    spec.tensor_parallel(model, init_device_mesh("cpu", (2,), mesh_dim_names=("tp",)))
    model.to_empty(device="cpu")
    model.init_weights(0)
    weights = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["embedding"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t._local_tensor if isinstance(t, DTensor) else t
        local = getattr(local, "elem", local)  # a collective's result still in flight wraps its tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in weights and not local.is_complex():  # the plan leaves the rotary tables out
            seen.setdefault(storage.data_ptr(), (storage.nbytes(), where[0]))
        return t

    for i, block in enumerate(model.layers.values()):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block{i}"))
    model.norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head"))
    tokens = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(tokens)
    totals: dict[str, float] = {}
    for nbytes, name in seen.values():
        totals[name] = totals.get(name, 0) + nbytes
    shape = spec.memory(args, 2, precision, "cpu", BATCH * SEQ)
    block = (totals["block0"] - shape.block_weight_casts) / (BATCH * SEQ)
    head = (totals["head"] - shape.head_weight_casts) / (BATCH * SEQ)
    if dist.get_rank() == 0:
        print(f"saved {precision} block {block} {shape.block}")
        print(f"saved {precision} head {head} {shape.head}")


def fsdp_peak(mode: str) -> None:
    """A training step of the Llama sharded by Keel's own parallelize (FSDP2 over both processes), as the trainer
    steps it, against the plan of that layout."""
    table = {"model": {**MODEL, "max_seq_len": 128}, "train": {"activation_checkpointing": mode, "precision": "fp32"}}
    cfg = build_config({**table, "parallel": {"nproc": 2}})
    spec, args = model_args(cfg.model_section())
    env = init_distributed("cpu")
    mesh = make_mesh(cfg.parallel, env)
    with torch.device("meta"):  # as the trainer builds it: sharded before it is allocated
        model = spec.build(args)
    model = parallelize(model, spec, cfg, env, mesh, contextlib.nullcontext).model  # fp32: no autocast
    optimizer = build_optimizer(model, cfg.optim, env.device)
    tokens = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(env.rank))

    def step() -> None:
        model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from the first step on
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs((tokens,))
    with tracker:
        step()
    measured = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    setup = Setup(1, 2, 1, 1, 4, 1, 128, mode, 0, "fp32")
    planned = estimate(spec.memory(args, 1, "fp32", "cpu", 4 * 128), setup, framework=0.0).tensors
    if env.rank == 0:
        print(f"fsdp {mode} {measured} {planned}")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for precision in ("fp32", "autocast"):
        saved(precision)
    for mode in ("none", "full"):
        fsdp_peak(mode)
    dist.destroy_process_group()
