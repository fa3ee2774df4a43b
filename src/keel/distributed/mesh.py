"""The device mesh: how the processes split into pipeline stages, data-parallel replicas and shards, and
tensor-parallel groups (outermost first)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from keel.config import ParallelConfig
from keel.distributed.env import DistEnv, all_reduce_sum
from keel.errors import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """The resolved mesh sizes; their product is the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: every one reads its own slice of each global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Whether parallelize shards with FSDP2: data parallel over several ranks, unless DDP alone replicates (a
        pipeline's stages and tensor-parallel models replicate through FSDP2 with one shard, HSDP)."""
        return self.dp > 1 and (self.dp_shard > 1 or self.tp > 1 or self.pp > 1)

    @property
    def size(self) -> int:
        """Processes the mesh spans."""
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        """`pp 2 x dp_replicate 2 x dp_shard 2 x tp 2` (pp only when pipelined), for logs and errors."""
        return " x ".join(f"{name} {getattr(self, name)}" for name in DIMS if name != "pp" or self.pp > 1)


def resolve_layout(cfg: ParallelConfig, world: int) -> Layout:
    """The mesh sizes of `[parallel]` for `world` processes (-1 takes the rest); a ConfigError if they do not fit."""
    sizes = {name: getattr(cfg, name) for name in DIMS}
    fixed = 1
    for size in sizes.values():
        fixed *= size if size > 0 else 1
    rest = [name for name, size in sizes.items() if size == -1]
    if rest:
        if world % fixed:
            raise ConfigError(
                f"parallel.{rest[0]}: the other mesh dimensions ({fixed} processes) do not divide the {world} "
                "processes; change parallel.pp / tp / dp_replicate / dp_shard or --nproc"
            )
        sizes[rest[0]] = world // fixed
    layout = Layout(**sizes)
    if layout.size != world:
        raise ConfigError(
            f"parallel: the mesh {layout.describe()} is {layout.size} processes, not the {world} launched; "
            "make their product the process count (or set one of dp_replicate / dp_shard to -1)"
        )
    return layout


@dataclass(frozen=True)
class Mesh:
    """This process's place in the mesh: the layout, torch's DeviceMesh (None alone), its data-parallel rank."""

    layout: Layout
    device_mesh: DeviceMesh | None
    dp_rank: int = 0
    dp_size: int = 1


def make_mesh(cfg: ParallelConfig, env: DistEnv) -> Mesh:
    """The mesh `[parallel]` describes over the processes of `env` (one process: a trivial mesh)."""
    layout = resolve_layout(cfg, env.world_size)
    if not env.distributed:
        return Mesh(layout, None)
    device_mesh = init_device_mesh(env.device.type, tuple(getattr(layout, name) for name in DIMS), mesh_dim_names=DIMS)
    _, replica, shard, _ = device_mesh.get_coordinate()
    # The ranks of one tensor-parallel group, and of one pipeline, read the same samples: the data-parallel rank
    # counts replicas and shards.
    return Mesh(layout, device_mesh, replica * layout.dp_shard + shard, layout.dp)


def all_reduce_dp_sum(value: torch.Tensor, mesh: Mesh | None) -> torch.Tensor:
    """Sum over the data-parallel ranks of a tensor the ranks of a tensor-parallel group hold alike."""
    # Every rank of a tensor-parallel group worked on the same samples: the sum over all ranks counts them tp times.
    total = all_reduce_sum(value)
    return total / mesh.layout.tp if mesh is not None and mesh.layout.tp > 1 else total
