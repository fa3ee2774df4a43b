"""A plan for a config: per-rank memory, step time, tokens per day, time, device-hours, cost and energy, before any
step runs; the fixes that make a layout fit; the fastest layouts that fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from keel.config import Config, split_batch
from keel.data.manifest import load_manifest
from keel.distributed.mesh import Layout, resolve_layout
from keel.errors import ConfigError, DataError
from keel.models import model_args
from keel.models.spec import ModelSpec
from keel.plan.devices import Device
from keel.plan.memory import Memory, Setup, estimate
from keel.plan.speed import Speed, step_speed

MAX_NODES = 4096  # the most machines a refusal's search tries
GB = 1e9


@dataclass(frozen=True)
class Planned:
    """The model a config trains, its vocabulary resolved as `keel train` would."""

    spec: ModelSpec
    args: BaseModel
    vocab_from: str  # where the vocabulary size came from


def planned_model(cfg: Config) -> Planned:
    """The config's model; model.vocab_size 0 takes the dataset's tokenizer, or prepare.vocab_size before one exists."""
    section = cfg.model_section()
    source = "model.vocab_size"
    if not section.get("vocab_size"):
        try:
            section["vocab_size"] = load_manifest(Path(cfg.data.dataset)).tokenizer.vocab_size
            source = f"the tokenizer of {cfg.data.dataset}"
        except DataError:
            section["vocab_size"], source = cfg.prepare.vocab_size, "prepare.vocab_size: no dataset yet"
    spec, args = model_args(section)
    if spec.memory is None:
        raise ConfigError(f"model.name: keel plan does not know the memory of {spec.name!r} models (no MemoryShape)")
    return Planned(spec, args, source)


@dataclass(frozen=True)
class Plan:
    """What one layout of a config costs on one device kind."""

    setup: Setup
    device: Device
    memory: Memory
    speed: Speed
    tokens_per_step: int
    flops_per_token: float
    steps: int
    price: float  # per device-hour

    @property
    def fits(self) -> bool:
        """Whether the busiest rank's memory fits its device."""
        return self.memory.total <= self.device.memory

    @property
    def tokens_per_s(self) -> float:
        """Tokens trained per second, all devices together."""
        return self.tokens_per_step / self.speed.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs utilisation over the whole step, communication and pipeline bubble included."""
        peak = self.device.peak(self.setup.precision) * self.setup.world
        return self.flops_per_token * self.tokens_per_s / peak

    @property
    def train_s(self) -> float:
        """Seconds to train train.steps steps."""
        return self.steps * self.speed.step_s

    @property
    def device_hours(self) -> float:
        """Device-hours to train train.steps steps."""
        return self.setup.world * self.train_s / 3600

    @property
    def cost(self) -> float:
        """What those device-hours cost at the price per device-hour."""
        return self.device_hours * self.price

    @property
    def energy_kwh(self) -> float:
        """Energy at the devices' rated power (an upper estimate: a busy device draws about that)."""
        return self.device_hours * self.device.watts / 1000

    def summary(self) -> dict[str, float | str]:
        """The figures a run records at its start (its `plan` event): those named after a metric are the ones
        `keel report` holds against the run's (on CPU the resident memory's peak, on a GPU torch's allocator peak)."""
        m = self.memory
        peak = ("memory_rss_peak_gb", m.total) if self.device.kind == "cpu" else ("memory_cuda_peak_gb", m.tensors)
        return {
            "device": self.device.name,
            "layout": describe(self.setup),
            "precision": self.setup.precision,
            peak[0]: peak[1] / GB,
            "peak_memory_gb": m.total / GB,
            **{f"breakdown_{name}_gb": value / GB for name, value in m.breakdown().items()},
            "peak_at": m.peak_at,
            "capacity_gb": self.device.memory / GB,
            "step_time_s": self.speed.step_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "mfu_compute": self.speed.mfu,
            "mfu_source": self.device.expected.source,
            "train_hours": self.train_s / 3600,
            "device_hours": self.device_hours,
            "cost": self.cost,
            "energy_kwh": self.energy_kwh,
        }


def describe(setup: Setup) -> str:
    """`pp 2 x dp_replicate 1 x dp_shard 4 x tp 2, selective, micro-batch 2`."""
    dims = " x ".join(f"{name} {getattr(setup, name)}" for name in ("pp", "dp_replicate", "dp_shard", "tp"))
    mode = setup.checkpointing + (
        f" every {setup.ac_every}" if setup.checkpointing == "selective" and setup.ac_every else ""
    )
    return f"{dims}, checkpointing {mode}, micro-batch {setup.micro_batch}"


def precision_of(cfg: Config, device: Device, layout: Layout | None = None) -> str:
    """How the run computes: fp32, bf16 autocast over fp32 weights (Keel's bf16; `auto` as the device decides), or
    bf16 weights where FSDP2 gathers them in bf16 (`parallel.fsdp_param_dtype`) on a `layout` that shards."""
    if cfg.parallel.fsdp_param_dtype == "bfloat16" and layout is not None and layout.fsdp:
        return "bf16"
    return {"fp32": "fp32", "bf16": "autocast"}.get(cfg.train.precision, device.auto_precision)


def setup_of(cfg: Config, sizes: dict[str, int], device: Device) -> Setup:
    """The Setup of `cfg` on a layout (resolved mesh sizes); a ConfigError when the batch does not split over it."""
    pp = sizes.get("pp", 1)
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    per_rank = split_batch(cfg.train.global_batch_size, dp, cfg.train.micro_batch_size)
    micro = cfg.train.micro_batch_size or per_rank
    forwards, in_flight = per_rank // micro, 1.0
    if pp > 1:  # each micro-batch is split again into the pipeline's micro-batches
        parallel = cfg.parallel.model_copy(update={"pp": pp})
        chunks, schedule = parallel.pipeline_microbatches, parallel.pp_schedule
        in_flight = pipeline_in_flight(schedule, pp, chunks, parallel.pipeline_stages // pp)
        micro, forwards = max(1, micro // chunks), forwards * chunks
    return Setup(
        dp_replicate=sizes["dp_replicate"],
        dp_shard=sizes["dp_shard"],
        tp=sizes["tp"],
        pp=pp,
        micro_batch=micro,
        accumulation=forwards,
        seq_len=cfg.train.seq_len,
        checkpointing=cfg.train.activation_checkpointing,
        ac_every=cfg.train.ac_every,
        precision=precision_of(cfg, device, Layout(**sizes)),
        pp_in_flight=in_flight,
    )


def pipeline_in_flight(schedule: str, pp: int, chunks: int, per_rank: int) -> float:
    """Micro-batches whose activations the first stage holds at once, in whole stages' worth."""
    if schedule == "gpipe":
        return float(chunks)
    if schedule == "interleaved_1f1b":  # torch's warm-up: (v - 1) pp + 2 (pp - 1) chunks of 1/v of the stage each
        return min(chunks * per_rank, (per_rank - 1) * pp + 2 * (pp - 1) + 1) / per_rank
    return float(min(pp, chunks))


def pipeline_bubble(cfg: Config, setup: Setup) -> float:
    """The share of compute a pipeline schedule leaves idle: (pp - 1) / micro-batches (x stages per rank)."""
    if setup.pp == 1:
        return 0.0
    parallel = cfg.parallel.model_copy(update={"pp": setup.pp})
    per = parallel.pipeline_stages // setup.pp
    return (setup.pp - 1) / (
        parallel.pipeline_microbatches * (per if parallel.pp_schedule == "interleaved_1f1b" else 1)
    )


def make_plan(cfg: Config, model: Planned, device: Device, setup: Setup, price: float) -> Plan:
    """The plan of one Setup: memory at the peak, step time, and the run's totals."""
    shape = model.spec.memory(model.args, setup.tp, setup.precision, device.kernels, setup.tokens)
    memory = estimate(shape, setup, device.framework, device.allocator)
    flops = model.spec.flops_per_token(model.args, cfg.train.seq_len)
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    bubble = pipeline_bubble(cfg, setup)
    speed = step_speed(flops, tokens, shape, setup, device, cfg.parallel.nproc, bubble, cfg.train.compile)
    return Plan(setup, device, memory, speed, tokens, flops, cfg.train.steps, price)


def config_setup(cfg: Config, device: Device) -> Setup:
    """The Setup of the config's own layout (its mesh over parallel.nproc x parallel.nnodes processes)."""
    layout = resolve_layout(cfg.parallel, cfg.parallel.world_size)
    sizes = {name: getattr(layout, name, 1) for name in ("pp", "dp_replicate", "dp_shard", "tp")}
    return setup_of(cfg, sizes, device)


def config_memory(cfg: Config, model: Planned, device: Device) -> Memory:
    """The per-rank memory of the config's own layout (no step time: nothing to measure)."""
    setup = config_setup(cfg, device)
    shape = model.spec.memory(model.args, setup.tp, setup.precision, device.kernels, setup.tokens)
    return estimate(shape, setup, device.framework, device.allocator)


def config_plan(cfg: Config, model: Planned, device: Device, price: float) -> Plan:
    """The plan of the config's own layout."""
    return make_plan(cfg, model, device, config_setup(cfg, device), price)


def layouts(world: int) -> Iterator[dict[str, int]]:
    """Every (pp, dp_replicate, dp_shard, tp) whose product is `world`."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for pp in divisors:
        for tp in (d for d in divisors if (world // pp) % d == 0):
            rest = world // pp // tp
            for shard in (d for d in divisors if rest % d == 0):
                yield {"pp": pp, "dp_replicate": rest // shard, "dp_shard": shard, "tp": tp}


Allowed = Callable[[Config], bool]  # whether keel train's preflight accepts a config's layout (as check_layout does)


def variants(cfg: Config, world: int, allowed: Allowed) -> Iterator[Config]:
    """The config on every layout of `world` processes, checkpointing mode and micro-batch that the preflight
    accepts (heads over tp, blocks and micro-batches over pp, the batch over the data-parallel ranks)."""
    for sizes in layouts(world):
        dp = sizes["dp_replicate"] * sizes["dp_shard"]
        if cfg.train.global_batch_size % dp:
            continue
        per_rank = cfg.train.global_batch_size // dp
        for micro in (m for m in range(1, per_rank + 1) if per_rank % m == 0):
            split = _with(cfg, parallel=sizes, train={"micro_batch_size": micro})
            if allowed(split):  # the checkpointing mode changes nothing the preflight checks
                for mode in ("none", "selective", "full"):
                    yield _with(split, train={"activation_checkpointing": mode, "ac_every": 0})


def search(cfg: Config, model: Planned, device: Device, price: float, allowed: Allowed, top: int = 10) -> list[Plan]:
    """The fastest layouts of the config's process count that fit, each with its best checkpointing and micro-batch."""
    best: dict[tuple[int, ...], Plan] = {}
    for variant in variants(cfg, cfg.parallel.world_size, allowed):
        plan = config_plan(variant, model, device, price)
        key = (plan.setup.pp, plan.setup.dp_replicate, plan.setup.dp_shard, plan.setup.tp)
        if plan.fits and (key not in best or _rank(plan) < _rank(best[key])):
            best[key] = plan
    return sorted(best.values(), key=_rank)[:top]


def _rank(plan: Plan) -> tuple[float, int]:
    """Faster first; at the same speed, larger micro-batches (fewer and larger matmuls, nearer the measured MFU)."""
    return plan.speed.step_s, -plan.setup.micro_batch


def fixes(cfg: Config, model: Planned, device: Device, plan: Plan, allowed: Allowed) -> list[str]:
    """Changes that make a plan that does not fit fit, each with the memory it then needs: computed, not generic."""
    found = []
    train = cfg.train
    lighter = {"none": ["selective", "full"], "selective": ["full"]}.get(train.activation_checkpointing, [])
    for mode in lighter:  # the least recomputation that fits
        trial = _with(cfg, train={"activation_checkpointing": mode, "ac_every": 0})
        if _plan(trial, model, device).fits:
            found.append(f'train.activation_checkpointing="{mode}" ({_gb(trial, model, device)})')
            break
    per_rank = train.global_batch_size // (plan.setup.dp_replicate * plan.setup.dp_shard)
    micro = train.micro_batch_size or per_rank
    for smaller in sorted((m for m in range(1, micro) if per_rank % m == 0), reverse=True):  # the largest that fits
        trial = _with(cfg, train={"micro_batch_size": smaller})
        if allowed(trial) and _plan(trial, model, device).fits:
            found.append(f"train.micro_batch_size={smaller} ({_gb(trial, model, device)})")
            break
    for other in search(cfg, model, device, plan.price, allowed, top=1):  # the same devices, split otherwise
        s = other.setup
        dims = f"parallel.dp_replicate={s.dp_replicate} dp_shard={s.dp_shard} tp={s.tp}" + (
            f" pp={s.pp}" if s.pp != cfg.parallel.pp else ""
        )
        found.append(f"{dims}, {describe(s).split(', ', 1)[1]} ({other.memory.total / GB:.1f} GB)")
    nodes = cfg.parallel.nnodes
    while nodes < MAX_NODES:  # more machines, the model sharded over all of them, no gradient accumulation
        nodes *= 2
        trial = _with(
            cfg, parallel={"nnodes": nodes, "dp_shard": -1, "dp_replicate": 1}, train={"micro_batch_size": None}
        )
        try:
            more = _plan(trial, model, device) if allowed(trial) else None
        except ConfigError:  # the batch does not split over that many ranks
            break
        if more is None:
            break
        if more.fits:
            where = f"{more.setup.world} devices, micro-batch {more.setup.micro_batch}"
            found.append(f"--nnodes {nodes} ({where}, {more.memory.total / GB:.1f} GB)")
            break
    return found


def _with(cfg: Config, **sections: dict) -> Config:
    return cfg.model_copy(
        update={name: getattr(cfg, name).model_copy(update=values) for name, values in sections.items()}
    )


def _plan(cfg: Config, model: Planned, device: Device) -> Plan:
    return config_plan(cfg, model, device, cfg.observe.price_per_device_hour)


def _gb(cfg: Config, model: Planned, device: Device) -> str:
    return f"{_plan(cfg, model, device).memory.total / GB:.1f} GB"


def refusal(cfg: Config, model: Planned, device: Device, plan: Plan, allowed: Allowed) -> str:
    """The one line refusing a layout that does not fit, with what would."""
    options = fixes(cfg, model, device, plan, allowed)
    batch = cfg.train.global_batch_size
    fix = (
        f"it fits with {', or '.join(options)}"
        if options
        else "no checkpointing, micro-batch or layout makes it fit, nor more machines while "
        f"train.global_batch_size ({batch}) splits over them: raise it, or train a smaller model"
    )
    return (
        f"parallel: {describe(plan.setup)} needs {plan.memory.total / GB:.1f} GB per rank "
        f"(peak at {plan.memory.peak_at}), more than the {device.memory / GB:.1f} GB of a {device.name}; {fix}"
    )
