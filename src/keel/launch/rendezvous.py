"""Where this machine stands in a multi-node run: node count, node rank, the c10d rendezvous endpoint and run id.

The flags of `keel train` (--nnodes, --node-rank, --rdzv-endpoint) win; under Slurm's `srun` the step's
environment fills what they leave out (SLURM_STEP_NUM_NODES or SLURM_NNODES, SLURM_NODEID, MASTER_ADDR or the
first host of the step's node list), so one `srun keel train CONFIG --nproc G` line starts every node.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from keel.errors import LaunchError

DEFAULT_PORT = 29500  # torchrun's own default rendezvous port
ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


@dataclass(frozen=True)
class Nodes:
    """This machine's place in the run; `endpoint` is None for a run on one machine."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None

    @property
    def multi(self) -> bool:
        """True when the run spans more than one machine."""
        return self.nnodes > 1


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: `gpu[003-005,009],cpu1` -> `gpu003`, `rack[1-2]-n[01-04]` -> `rack1-n01`."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    # Each bracketed range contributes its first number, zero padding kept.
    return re.sub(r"\[([^\]\-,]*)[^\]]*\]", r"\1", nodelist[:end]).strip()


def _slurm_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def resolve_nodes(
    nnodes: int | None, node_rank: int | None, endpoint: str | None, env: Mapping[str, str] = os.environ
) -> Nodes:
    """The flags, with Slurm's step environment as defaults; one line naming the option for bad input."""
    in_slurm = "SLURM_JOB_ID" in env
    if in_slurm:
        # The step's own numbers under srun; the allocation's in the batch shell (which runs on its first node).
        nnodes = nnodes if nnodes is not None else _slurm_int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
        node_rank = node_rank if node_rank is not None else _slurm_int(env, "SLURM_NODEID")
    nnodes, node_rank = 1 if nnodes is None else nnodes, 0 if node_rank is None else node_rank
    if nnodes < 1:
        raise LaunchError(f"--nnodes {nnodes}: a run needs at least one node")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"--node-rank {node_rank} is outside [0, {nnodes}) for --nnodes {nnodes}; nodes count from 0")
    if nnodes == 1:
        return Nodes()
    if endpoint is None and in_slurm:
        host = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        endpoint = f"{host}:{env.get('MASTER_PORT') or DEFAULT_PORT}" if host else None
    if endpoint is None:
        raise LaunchError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free port, the same on "
            "every node), or Slurm's srun to set SLURM_JOB_NODELIST"
        )
    found = ENDPOINT.match(endpoint)
    if found is None or not 0 < int(found.group(3)) < 65536:
        raise LaunchError(
            f"--rdzv-endpoint {endpoint!r} is not HOST:PORT (e.g. node0.cluster:29500 or 10.0.0.1:29500, a port "
            "below 65536)"
        )
    return Nodes(nnodes, node_rank, endpoint)


def rdzv_id(run_dir: Path) -> str:
    """The rendezvous id of a run: the same on every node, and on every restart, relaunch or requeue of its run dir
    (which every node sees at one path: its resolved config, compared across nodes, names it)."""
    return "keel-" + hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
