"""Process-group set-up and tear-down: who am I, how many are we, which device is mine."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from keel.errors import LaunchError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the rank that writes run-dir files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is up (more than one process)."""
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """Resolve `train.device` (auto, cpu, cuda) to this process's device."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise LaunchError("train.device is 'cuda' but no CUDA device is visible; set train.device=cpu or auto")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_preference: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise LaunchError(f"cannot join the process group ({backend}, rank {rank} of {world}): {e}") from None
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier() -> None:
    """Wait for every rank (no-op when alone)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (the tensor itself when alone)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (the tensor itself when alone)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_agree(flag: bool) -> bool:
    """True only if `flag` is true on every rank, so all ranks take the same branch."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return int(value.item()) == 0


def collective_device() -> str:
    """The device small tensors of Keel's own collectives live on: CUDA for NCCL, else the CPU."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (all the same length), in rank order."""
    if not dist.is_initialized():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.float64, device=collective_device())
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [row.tolist() for row in rows]


def all_gather_text(text: str) -> list[str]:
    """Every rank's short string (a host name), in rank order: length byte + bytes, so nothing is unpickled."""
    if not dist.is_initialized():
        return [text]
    data = text.encode()[:255]  # what one length byte can count; host names are at most 253
    mine = torch.zeros(256, dtype=torch.uint8, device=collective_device())
    mine[0] = len(data)
    mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [bytes(row[1 : 1 + int(row[0])].tolist()).decode(errors="replace") for row in rows]


def shutdown(exit_code: int) -> None:
    """Leave the process group cleanly and exit the worker process.

    Gloo workers can abort in C++ teardown after all work is done; a barrier, an explicit
    destroy and `os._exit` avoid it (see docs/torch-on-cpu.md).
    """
    if dist.is_initialized():
        if exit_code == 0:
            dist.barrier()
        dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)
