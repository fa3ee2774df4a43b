"""Parallelism applied to a model from outside it: pipeline stages, float8 layers, tensor parallel, activation
checkpointing, compile, FSDP2 (with its mixed-precision policy) or DDP; the result is the step runner the trainer
drives."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from keel.config import Config
from keel.distributed.activation_checkpointing import apply_activation_checkpointing
from keel.distributed.env import DistEnv
from keel.distributed.float8 import convert_to_float8
from keel.distributed.grads import parameter_group
from keel.distributed.mesh import Mesh
from keel.distributed.pipeline import PipelineStep, rank_stages, split_stage, stage_blocks
from keel.distributed.step import Context, LocalStep, StepRunner
from keel.models.spec import ModelSpec

log = logging.getLogger("keel")


def parallelize(
    model: nn.Module, spec: ModelSpec, cfg: Config, env: DistEnv, mesh: Mesh, autocast: Context
) -> StepRunner:
    """Make a model built on the meta device ready to train, in torchtitan's order: split into pipeline stages,
    then per stage float8 linear layers, tensor parallel, activation checkpointing, compile, FSDP2 on the
    data-parallel mesh; allocate this rank's shards and initialise them (the same weights however they are split);
    DDP, which broadcasts real weights, wraps it last. Returns the runner that steps it (autocast: the forward's
    precision context)."""
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
    """Float8 layers, tensor parallel, activation checkpointing, compile and FSDP2 (all but plain replication) on
    a meta-device model or stage; then allocate this rank's shards and initialise them."""
    layout = mesh.layout
    if cfg.train.fp8:
        swapped = convert_to_float8(model, spec.high_precision)
        kept = [name for name, module in model.named_modules() if type(module) is nn.Linear]
        log.info(f"fp8: {len(swapped)} linear layers run their matmuls in float8; kept as they were: {kept}")
    if layout.tp > 1:
        spec.tensor_parallel(model, mesh.device_mesh["tp"])
    apply_activation_checkpointing(model, spec.shard_units, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        for block in spec.shard_units(model):
            block.compile()
    # A pipeline's stages replicate through FSDP too (HSDP with one shard): DDP cannot wrap a stage the schedule runs.
    if layout.fsdp:
        dims = ("dp_replicate", "dp_shard") if layout.dp_replicate > 1 else ("dp_shard",)
        dp_mesh = mesh.device_mesh[dims]  # two dimensions: HSDP, sharded within replicas, replicated across
        policy, par = mixed_precision(cfg), cfg.parallel
        log.info(
            f"fsdp2: parameters gathered in {par.fsdp_param_dtype or 'float32'}, gradients reduced in "
            f"{par.fsdp_reduce_dtype or 'float32'}; shards and optimizer states float32"
        )
        for unit in [*spec.shard_units(model), model]:
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    model.to_empty(device=env.device)
    spec.init_weights(model, cfg.run.seed)
    return model


def mixed_precision(cfg: Config) -> MixedPrecisionPolicy:
    """FSDP2's policy from `[parallel] fsdp_param_dtype, fsdp_reduce_dtype` (unset: float32, no casts). The sharded
    parameters, their gradients and the optimizer's states stay float32 whatever it says."""
    par = cfg.parallel
    param = getattr(torch, par.fsdp_param_dtype) if par.fsdp_param_dtype else None
    reduce = getattr(torch, par.fsdp_reduce_dtype) if par.fsdp_reduce_dtype else None
    if param is not None and reduce is None:
        reduce = torch.float32  # FSDP2 would otherwise reduce in the parameters' dtype
    # Inputs keep their dtype: a block's hidden states arrive in param_dtype from the layers before it, and the rotary
    # tables it is given stay float32 (RoPE's torch.complex has no bf16 kernel, and bf16 would round them).
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce, cast_forward_inputs=False)
