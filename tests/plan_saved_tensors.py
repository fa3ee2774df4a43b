"""Run under torchrun with 2 processes: per-token bytes the tensor-parallel Llama saves, measured and planned.

Prints `saved PRECISION PART MEASURED PLANNED` on rank 0 for block 0 and the head (tests/test_plan_memory.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from keel.models import model_args

BATCH, SEQ = 2, 64


def saved(precision: str) -> None:
    model = {"dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "max_seq_len": SEQ}
    spec, args = model_args({"name": "llama", **model})
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

    for i, block in enumerate(model.layers):
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


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for precision in ("fp32", "autocast"):
        saved(precision)
    dist.destroy_process_group()
