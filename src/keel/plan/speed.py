"""Step time of a layout: model FLOPs over (devices x peak x expected MFU), plus what communication and the
pipeline's bubble add.

  compute   FLOPs per token x tokens per step / (devices x peak x MFU). The expected MFU is converted to this
            run's activation checkpointing: recomputing a block's forward costs a third of its forward-backward
            FLOPs, which MFU (model FLOPs only) does not count, so full checkpointing runs at 3/4 of the MFU
  tensor    per block and micro-batch, sequence parallel gathers and reduce-scatters the residual stream twice in
  parallel  forward and twice in backward (again in a recomputed forward); not overlapped with compute
  data      FSDP2 gathers the parameters in forward and backward and reduce-scatters the gradients; DDP all-reduces
  parallel  them; overlapped with compute, so only what exceeds it counts
  pipeline  1F1B and GPipe idle (pp - 1) / micro-batches of the compute, interleaved 1F1B that over its stages per rank
"""

from __future__ import annotations

from dataclasses import dataclass

from keel.models.spec import MemoryShape
from keel.plan.devices import Device
from keel.plan.memory import Setup


@dataclass(frozen=True)
class Speed:
    """Seconds per optimizer step and where they go, for one layout on one device kind."""

    compute_s: float
    tensor_parallel_s: float
    data_parallel_s: float  # the part not hidden behind compute
    bubble_s: float
    mfu: float  # the MFU the compute time assumes (this run's checkpointing)

    @property
    def step_s(self) -> float:
        """Seconds per optimizer step."""
        return self.compute_s + self.tensor_parallel_s + self.data_parallel_s + self.bubble_s


def recomputed(checkpointing: str, ac_every: int) -> float:
    """The share of the blocks' forward a mode recomputes in backward (per-op selective recomputes no matmul)."""
    if checkpointing == "full":
        return 1.0
    if checkpointing == "selective" and ac_every:
        return 1.0 / ac_every
    return 0.0


def expected_mfu(device: Device, setup: Setup, compiled: bool = True) -> float:
    """The device's expected MFU (eager, where measured so, for a run without torch.compile), moved from the
    checkpointing it was measured with to this run's."""
    expected = device.expected
    mfu = expected.mfu if compiled or expected.eager_mfu is None else expected.eager_mfu
    measured = 1 + recomputed(expected.checkpointing, 0) / 3
    return mfu * measured / (1 + recomputed(setup.checkpointing, setup.ac_every) / 3)


def collective_bandwidth(group: int, inner: int, nproc: int, device: Device) -> float:
    """Bytes/s of a collective over `group` ranks `inner` apart: NVLink while the group stays in one machine."""
    return device.intra_node if group * inner <= nproc else device.inter_node


def step_speed(
    flops_per_token: float,
    tokens_per_step: int,
    shape: MemoryShape,
    setup: Setup,
    device: Device,
    nproc: int,
    pp_bubble: float = 0.0,
    compiled: bool = True,
) -> Speed:
    """The step time of `setup` on `device` with `nproc` processes per machine; pp_bubble: idle share of compute;
    compiled: whether the blocks run under torch.compile."""
    mfu = expected_mfu(device, setup, compiled)
    compute = flops_per_token * tokens_per_step / (setup.world * device.peak(setup.precision) * mfu)
    t, blocks = setup.tp, shape.n_blocks / setup.pp
    tp_s = 0.0
    if t > 1:
        residual = shape.block_input * t * setup.micro_batch * setup.seq_len  # bytes of one gathered activation
        per_block = 8 + 4 * recomputed(setup.checkpointing, setup.ac_every)
        moved = (per_block * blocks + 1) * residual * (t - 1) / t * setup.accumulation
        tp_s = moved / collective_bandwidth(t, 1, nproc, device)
    dp_s = 0.0
    local = (blocks * shape.block_params + shape.outer_params / setup.pp) / t
    if setup.fsdp and setup.dp_shard > 1:
        s = setup.dp_shard
        gathered = 2 if setup.precision == "bf16" else 4
        gathers = 1 if setup.pp > 1 else 2  # a pipeline stage stays gathered from forward to backward
        moved = (gathers * gathered * setup.accumulation + 4) * local * (s - 1) / s
        dp_s += moved / collective_bandwidth(s, t, nproc, device)
    replicas = setup.dp_replicate
    if replicas > 1:  # an all-reduce of the (sharded) gradients across replicas: twice their bytes
        moved = 2 * 4 * local / setup.dp_shard * (replicas - 1) / replicas
        dp_s += moved / collective_bandwidth(replicas, t * setup.dp_shard, nproc, device)
    return Speed(compute, tp_s, max(0.0, dp_s - compute), compute * pp_bubble, mfu)
