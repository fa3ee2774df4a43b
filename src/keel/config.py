"""The typed config schema: TOML in, dotted `--set` overrides, one-line errors naming the key."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keel.config_prepare import PrepareConfig, Section
from keel.errors import ConfigError


class RunConfig(Section):
    name: str = Field("keel", min_length=1, description="Name of the run; the run dir defaults to runs/<name>.")
    dir: str | None = Field(None, description="Run directory; empty means runs/<run.name>.")
    seed: int = Field(0, ge=0, description="Seed for weight init and the global sample order.")


class DataConfig(Section):
    dataset: str = Field(
        "data/keel", description="Prepared dataset directory: what training reads and `keel data prepare` writes."
    )
    mixture: dict[str, float] = Field(
        default_factory=dict,
        description="Train on a weighted mixture {dataset_dir = weight} instead of data.dataset (which keeps val).",
    )
    num_workers: int = Field(
        0, ge=0, description="Loader processes reading batches ahead (torchdata StatefulDataLoader); 0 reads inline."
    )
    prefetch_factor: int = Field(4, gt=0, description="Batches each loader worker keeps ready ahead of the step.")
    # Independent switches, as Megatron's reset_position_ids and reset_attention_mask. RoPE sees only relative
    # positions, so the mask alone already isolates documents; positions alone still attend across documents.
    document_positions: bool = Field(
        False, description="Restart position ids at 0 after each EOS in a sample (Megatron's reset_position_ids)."
    )
    document_mask: bool = Field(
        False, description="Attend only within a document: block-diagonal causal mask (dense: slower attention)."
    )
    manifest_sha256: str | None = Field(
        None, description="Hash of the dataset manifest; set at first start so a resume refuses a changed dataset."
    )
    mixture_sha256: dict[str, str] = Field(
        default_factory=dict,
        description="Manifest hash of each data.mixture dataset, set at start so a resume refuses a changed one.",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_prepare(cls, data: Any) -> Any:
        moved = [key for key in data if key in PrepareConfig.model_fields] if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{moved[0]}: moved to [prepare] (prepare.{moved[0]}); put it under [prepare]")
        return data


class TrainConfig(Section):
    steps: int = Field(100, gt=0, description="Optimizer steps to train for.")
    seq_len: int = Field(256, gt=0, description="Tokens per training sequence.")
    global_batch_size: int = Field(16, gt=0, description="Sequences per optimizer step, summed over all ranks.")
    micro_batch_size: int | None = Field(
        None, gt=0, description="Sequences per rank per forward pass; empty means no gradient accumulation."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 turns clipping off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision: bf16 autocast, fp32, or auto (bf16 on CUDA; on CPU bf16 if a start-up "
        "probe measures its matmuls at least 1.3x faster than fp32).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device to train on; auto picks CUDA if present."
    )
    compile: bool = Field(False, description="Compile the model with torch.compile (helps on GPU, not on CPU).")
    fp8: bool = Field(
        False,
        description="Run the blocks' linear layers' matmuls in float8 (torchao Float8Linear; CPU, or CUDA compute "
        "capability 8.9+).",
    )
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none", description="Recompute activations in backward: none, selective (see train.ac_every) or every block."
    )
    ac_every: int = Field(
        0, ge=0, description="Selective: recompute every N-th block; 0 keeps matmul and attention outputs per op."
    )
    eval_every: int = Field(50, ge=0, description="Compute validation loss every this many steps; 0 turns it off.")
    eval_batches: int = Field(4, gt=0, description="Global batches of validation data per evaluation.")
    stop_after: int | None = Field(
        None, gt=0, description="Stop this invocation after this step, as a preemption would; resume continues."
    )


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of optim.lr.")
    warmup_steps: int = Field(10, ge=0, description="Steps of linear warm-up before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")


class ParallelConfig(Section):
    """The device mesh: pp x dp_replicate x dp_shard x tp processes, their product the world size."""

    nproc: int = Field(1, gt=0, description="Processes to launch on this machine (one per GPU, or CPU workers).")
    nnodes: int = Field(1, gt=0, description="Machines the run spans, each running nproc processes (--nnodes).")
    dp_replicate: int = Field(
        1, description="Data-parallel replicas (DDP; with dp_shard > 1 HSDP); -1 takes the processes left."
    )
    dp_shard: int = Field(-1, description="Data-parallel shards (FSDP2) within a replica; -1 takes the processes left.")
    tp: int = Field(1, gt=0, description="Tensor parallel, with sequence parallel: heads and MLP split this many ways.")
    pp: int = Field(1, gt=0, description="Pipeline parallel: the blocks split into stages over this many ranks.")
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe"] = Field(
        "1f1b", description="Pipeline schedule: 1f1b, interleaved_1f1b (several stages per rank) or gpipe."
    )
    pp_microbatches: int | None = Field(
        None, gt=0, description="Micro-batches a pipeline step splits each batch into; empty = the stage count."
    )
    pp_stages_per_rank: int | None = Field(
        None, gt=0, description="Pipeline stages per rank; empty = 2 for interleaved_1f1b, else 1."
    )
    fsdp_param_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="FSDP2 only: dtype parameters are all-gathered and computed in (shards and optimizer stay "
        "float32); empty = float32.",
    )
    fsdp_reduce_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="FSDP2 only: dtype gradients are reduce-scattered in; empty = float32."
    )

    @model_validator(mode="before")
    @classmethod
    def _dp_replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dp" in data:
            raise ValueError(
                "dp: replaced by parallel.dp_replicate and parallel.dp_shard (fsdp: the default; "
                "ddp: dp_replicate = -1 and dp_shard = 1)"
            )
        return data

    @model_validator(mode="after")
    def _one_rest(self) -> ParallelConfig:
        sizes = {"dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"{name}: must be a positive number of processes or -1 (the rest), not {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError("dp_replicate: only one of dp_replicate and dp_shard can be -1 (the processes left)")
        return self

    @property
    def world_size(self) -> int:
        """Processes in the whole run: nproc on each of nnodes machines."""
        return self.nnodes * self.nproc

    @property
    def pipeline_stages(self) -> int:
        """Pipeline stages in all: pp times the stages each rank runs."""
        return self.pp * (self.pp_stages_per_rank or (2 if self.pp_schedule == "interleaved_1f1b" else 1))

    @property
    def pipeline_microbatches(self) -> int:
        """Micro-batches per pipeline step: parallel.pp_microbatches, or one per stage."""
        return self.pp_microbatches or self.pipeline_stages


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="Save a checkpoint every this many steps; 0 saves only at the end.")
    keep: int = Field(3, gt=0, description="Committed checkpoints to keep; the newest is never deleted.")
    keep_every: int = Field(
        0, ge=0, description="Also keep every checkpoint whose step is a multiple of this; 0 turns it off."
    )
    async_save: bool = Field(
        False, description="Write checkpoints in the background while training goes on (committed when done)."
    )
    init_from_hf: str | None = Field(
        None, description="Hugging Face Llama-format directory whose weights a fresh run starts from (step 0)."
    )


class ObserveConfig(Section):
    log_every: int = Field(1, gt=0, description="Print and record training metrics every this many steps.")
    console: bool = Field(True, description="Print a progress line on rank 0.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to RUN_DIR/tb/.")
    prometheus: bool = Field(False, description="Serve metrics for Prometheus, one exporter per rank.")
    prometheus_host: str = Field("127.0.0.1", description="Address the Prometheus exporters listen on.")
    prometheus_port: int = Field(
        9400, gt=0, lt=65536, description="Port of local rank 0's exporter; local rank r listens on port + r."
    )
    profile_steps: list[list[int]] = Field(
        default_factory=list,
        description="Step ranges to profile with torch.profiler, e.g. [[10, 12]]; traces go to RUN_DIR/profiles/.",
    )
    stall_timeout_s: float = Field(
        600.0, gt=0, description="`keel status` calls a run stalled when its heartbeat is older than this."
    )
    heartbeat_s: float = Field(
        10.0, ge=0, description="Rewrite RUN_DIR/status.json at most this often (seconds); below stall_timeout_s."
    )
    straggler_every: int = Field(
        50, ge=0, description="Every this many steps the ranks compare their speeds to find stragglers (0 = never)."
    )
    straggler_margin: float = Field(
        0.2, gt=0, description="A rank this much slower than the median (0.2 = 20%) is reported as a straggler."
    )
    audit_every: int = Field(
        0,
        ge=0,
        description="Run the bias audit probe on the live model every this many steps and at the end (0 = off).",
    )
    audit_templates: str = Field(
        "", description="Bias audit template file for observe.audit_every; empty means the templates Keel ships."
    )
    wandb: bool = Field(False, description="Log rank 0's metrics to Weights & Biases (needs `pip install wandb`).")
    wandb_project: str = Field("keel", description="The Weights & Biases project runs are logged to.")
    price_per_device_hour: float = Field(
        2.0, ge=0, description="USD per device-hour (a GPU, or a CPU process) for the card's cost; set your own price."
    )
    grid_gco2_per_kwh: float = Field(
        480.0, ge=0, description="Grid carbon intensity (gCO2e/kWh) for the card's CO2e; 480 is about the world mean."
    )

    @field_validator("profile_steps")
    @classmethod
    def _ranges(cls, ranges: list[list[int]]) -> list[list[int]]:
        for r in ranges:
            if len(r) != 2 or not 0 < r[0] <= r[1]:
                raise ValueError(f"each range must be [first, last] with 0 < first <= last, got {r}")
        return ranges

    @model_validator(mode="after")
    def _heartbeat_before_stall(self) -> ObserveConfig:
        if self.heartbeat_s >= self.stall_timeout_s:
            raise ValueError(
                f"heartbeat_s: {self.heartbeat_s} must be below observe.stall_timeout_s "
                f"({self.stall_timeout_s}), or every live run would look stalled"
            )
        return self


class DistributedConfig(Section):
    timeout_s: float = Field(
        1800.0, gt=0, description="Seconds a collective may wait for the other ranks before it fails the process."
    )
    join_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a node waits for the others: for node 0's run dir, and in the rendezvous."
    )


class ResilienceConfig(Section):
    max_restarts: int = Field(
        3, ge=0, description="Times failed workers are restarted; each restart resumes from the newest checkpoint."
    )
    preempt_signals: list[str] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"],
        description="Signals that preempt a run: all ranks stop at one step, commit a checkpoint and exit.",
    )
    hang_timeout_s: float = Field(
        600.0, ge=0, description="A step running longer than this is a hang: stacks dumped, rank restarted (0 = off)."
    )
    nonfinite: Literal["skip", "rollback", "stop"] = Field(
        "rollback",
        description="On a non-finite loss or gradient norm the update is skipped; repeats then roll back or stop.",
    )
    nonfinite_patience: int = Field(
        3, gt=0, description="Consecutive non-finite steps before nonfinite=rollback reloads the last checkpoint."
    )
    spike_factor: float = Field(
        3.0, ge=0, description="A loss above this times the running median is a spike: roll back (0 = off)."
    )
    spike_window: int = Field(
        50, ge=4, le=1024, description="Steps in the running median the spike check compares with."
    )
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks allowed in a run before it stops with an error.")
    inject: str = Field(
        "", description="Faults to inject, for tests, e.g. 'kill:rank=1:step=30, nan:step=50' (see README)."
    )

    @field_validator("preempt_signals")
    @classmethod
    def _signals(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name.startswith("SIG") or not hasattr(signal, name) or name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"{name!r} is not a signal that can be caught (e.g. SIGTERM, SIGUSR1)")
        return names


class CardConfig(Section):
    """What the model card states that no run can measure: written by the user."""

    license: str = Field("unknown", description="The trained model's license tag for its card (e.g. apache-2.0).")
    intended_use: str = Field("", description="What the model is for, and for whom; the card says so verbatim.")
    limitations: str = Field("", description="Known limitations, risks and out-of-scope uses, for the card.")


class ModelConfig(BaseModel):
    """The [model] section: `name` picks the registry entry, the other keys are that model's arguments."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("llama", description="Model from the registry (keel.models.MODELS).")


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    observe: ObserveConfig = Field(default_factory=ObserveConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    resilience: ResilienceConfig = Field(default_factory=ResilienceConfig)
    card: CardConfig = Field(default_factory=CardConfig)

    @model_validator(mode="before")
    @classmethod
    def _migrate_run_config(cls, data: Any) -> Any:
        # A run dir's config.toml written before [prepare] and the mesh existed holds the preparation keys under
        # [data] and parallel.dp. It is Keel's own record (only a started run sets data.manifest_sha256), so its
        # keys are moved, not refused.
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        section, prepare = data["data"], data.get("prepare", {})
        if not section.get("manifest_sha256") or not isinstance(prepare, dict):
            return data
        moved = {key: value for key, value in section.items() if key in PrepareConfig.model_fields}
        kept = {key: value for key, value in section.items() if key not in moved}
        parallel = dict(data.get("parallel") or {})
        if parallel.get("dp") == "ddp":  # before the mesh: data parallelism was ddp or fsdp over all processes
            parallel.update(dp_replicate=-1, dp_shard=1)
        parallel.pop("dp", None)
        return {**data, "data": kept, "prepare": {**moved, **prepare}, "parallel": parallel}

    @property
    def run_dir(self) -> Path:
        """The run directory: run.dir, or runs/<run.name>."""
        return Path(self.run.dir or f"runs/{self.run.name}")

    def model_section(self) -> dict[str, Any]:
        """The raw [model] table (name plus the model's arguments) for the model registry."""
        return self.model.model_dump()


ROOT_SECTIONS = tuple(Config.model_fields)


def split_batch(global_batch: int, dp_size: int, micro: int | None = None) -> int:
    """Sequences per data-parallel rank and step; a batch that does not split evenly is a ConfigError."""
    if global_batch % dp_size:
        raise ConfigError(
            f"train.global_batch_size {global_batch} does not split over {dp_size} data-parallel ranks; "
            "make it a multiple of the process count"
        )
    per_rank = global_batch // dp_size
    if micro is not None and per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size {micro} does not divide the per-rank batch {per_rank} "
            "(train.global_batch_size / data-parallel ranks)"
        )
    return per_rank


def _names_section(model: type[BaseModel], loc: list[str]) -> bool:
    """Whether `loc` leads to a whole section (a model) of `model` rather than to one of its fields."""
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return False
        model = field.annotation
    return True


def validation_message(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem of a ValidationError of `model` as one line `key: what is wrong` (keys under `prefix`)."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join([prefix, *loc] if prefix else loc)
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key (see `keel train --help-config` for the keys)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        # A check across a section's fields has no field location; its message starts with the key it blames.
        return (f"{key}.{msg}" if key else msg) if _names_section(model, loc) else f"{key}: {msg}"
    shown = "" if isinstance(first.get("input"), dict) else f" (got {first.get('input')!r})"
    return f"{key}: {msg}{shown}"


def describe_keys() -> list[tuple[str, str, str]]:
    """Every config key with its default and one-line doc, for `--help-config`."""
    rows = []
    for section, field in Config.model_fields.items():
        cls = field.annotation if isinstance(field.annotation, type) else None
        if cls is None or not issubclass(cls, BaseModel):
            continue
        for name, f in cls.model_fields.items():
            default = f.get_default(call_default_factory=True)
            rows.append((f"{section}.{name}", repr(default), f.description or ""))
    return rows
