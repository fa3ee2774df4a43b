"""Parallelism applied to a model from outside it: pipeline stages, tensor parallel, activation checkpointing,
compile, FSDP2 or DDP; the result is the step runner the trainer drives."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from keel.config import Config
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.distributed.env import DistEnv
from keel.distributed.grads import parameter_group
from keel.distributed.mesh import Mesh
from keel.distributed.pipeline import PipelineStep, rank_stages, split_stage, stage_blocks
from keel.distributed.step import Context, LocalStep, StepRunner
from keel.models.spec import ModelSpec


def parallelize(
    model: nn.Module, spec: ModelSpec, cfg: Config, env: DistEnv, mesh: Mesh, autocast: Context
) -> StepRunner:
    """Make a model built on the meta device ready to train, in torchtitan's order: split into pipeline stages,
    then per stage tensor parallel, activation checkpointing, compile, FSDP2 on the data-parallel mesh; allocate
    this rank's shards and initialise them (the same weights however they are split); DDP, which broadcasts real
    weights, wraps it last. Returns the runner that steps it (autocast: the forward's precision context)."""
    groups = sorted({parameter_group(name) for name, _ in model.named_parameters()})
    layout = mesh.layout
    if layout.pp > 1:
        n_stages, split = cfg.parallel.pipeline_stages, spec.pipeline
        blocks = stage_blocks(len(spec.shard_units(model)), n_stages)
        pp_rank = mesh.device_mesh["pp"].get_local_rank()
        stages = rank_stages(pp_rank, layout.pp, n_stages // layout.pp)
        parts = [split_stage(model, split, blocks[s], s == 0, s == n_stages - 1) for s in stages]
        for part in parts:
            # Kept gathered between a micro-batch's forward and backward: each stage runs many of them per step.
            _prepare(part, spec, cfg, env, mesh, reshard_after_forward=False)
        return PipelineStep(parts, stages, cfg.parallel, mesh, env.device, autocast, groups)
    model = _prepare(model, spec, cfg, env, mesh)
    if layout.dp > 1 and layout.dp_shard == 1 and layout.tp == 1:
        device_ids = [env.local_rank] if env.device.type == "cuda" else None
        group = mesh.device_mesh["dp_replicate"].get_group()
        model = DistributedDataParallel(model, device_ids=device_ids, process_group=group)
    return LocalStep(model, [model], mesh, env.device, autocast, groups)


def _prepare(
    model: nn.Module, spec: ModelSpec, cfg: Config, env: DistEnv, mesh: Mesh, reshard_after_forward: bool = True
) -> nn.Module:
    """Tensor parallel, activation checkpointing, compile and FSDP2 (all but plain replication) on a meta-device
    model or stage; then allocate this rank's shards and initialise them."""
    layout = mesh.layout
    if layout.tp > 1:
        spec.tensor_parallel(model, mesh.device_mesh["tp"])
    apply_activation_checkpointing(model, spec.shard_units, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        for block in spec.shard_units(model):
            block.compile()
    # A pipeline's stages replicate through FSDP too (HSDP with one shard): DDP cannot wrap a stage the schedule runs.
    replicate_only = layout.dp_shard == 1 and layout.tp == 1 and layout.pp == 1
    if layout.dp > 1 and not replicate_only:
        dims = ("dp_replicate", "dp_shard") if layout.dp_replicate > 1 else ("dp_shard",)
        dp_mesh = mesh.device_mesh[dims]  # two dimensions: HSDP, sharded within replicas, replicated across
        for unit in spec.shard_units(model):
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    model.to_empty(device=env.device)
    spec.init_weights(model, cfg.run.seed)
    return model
