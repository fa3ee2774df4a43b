"""Planning a run: the device a plan is for, the layouts a model allows, the preflight's fit check, `keel plan`."""

from __future__ import annotations

import os

import psutil
import torch

from keel.config import Config
from keel.distributed.env import DistEnv
from keel.errors import ConfigError
from keel.observe.mfu import measured_matmul_flops
from keel.plan.devices import GPUS, Device, cpu_device, cuda_device
from keel.plan.planner import (
    Allowed,
    Plan,
    Planned,
    config_memory,
    config_plan,
    planned_model,
    refusal,
    search,
)
from keel.plan.text import plan_lines, search_table
from keel.train.checks import check_layout, check_low_precision
from keel.train.precision import choose_cpu_precision


def process_rss() -> float:
    """This process's resident memory in bytes: a training process's baseline once it has loaded what one loads."""
    return float(psutil.Process().memory_info().rss)


def this_cpu(processes: int, framework: float) -> Device:
    """This machine's CPU as `processes` training processes see it: their matmul ceilings in fp32 and bf16, measured
    with one process's threads (keel train gives each cores / processes), and the precision auto picks from them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    try:
        fp32 = measured_matmul_flops(torch.float32)
        bf16 = measured_matmul_flops(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    auto = "autocast" if choose_cpu_precision(fp32, bf16).dtype == torch.bfloat16 else "fp32"
    return cpu_device(processes, framework, fp32, bf16, auto)


def device_for(cfg: Config, kind: str | None, measure: bool = True) -> Device:
    """The device to plan for: `kind` (h100, h200, a100, cpu), else the GPU this machine has, else its CPU."""
    if kind is None and cfg.train.device != "cpu" and torch.cuda.is_available():
        found = cuda_device()
        if found is None:
            name = torch.cuda.get_device_properties(0).name
            raise ConfigError(f"--device: keel plan has no figures for {name!r}; pass --device h100, h200 or a100")
        return found
    if kind in GPUS:
        return GPUS[kind]
    import keel.train.worker  # noqa: F401  (loaded, as a training process has, before the RSS is read)

    if not measure:  # memory alone: nothing to time
        return cpu_device(cfg.parallel.nproc, process_rss(), 0.0, 0.0, "fp32")
    return this_cpu(cfg.parallel.nproc, process_rss())


def layout_allowed(model: Planned) -> Allowed:
    """Whether keel train's preflight accepts a config's layout for the model: the mesh, the model's split over it
    (heads over tp, blocks and micro-batches over pp) and the low-precision keys on it."""

    def allowed(cfg: Config) -> bool:
        try:
            check_layout(cfg, model.spec, model.args)
            check_low_precision(cfg)
        except ConfigError:
            return False
        return True

    return allowed


def price_of(cfg: Config, price: float | None) -> float:
    """The price per device-hour: --price-per-device-hour, else observe.price_per_device_hour."""
    return price if price is not None else cfg.observe.price_per_device_hour


def check_fits(cfg: Config) -> None:
    """Refuse, before any process starts, a layout whose busiest rank would not fit its device's memory (a model
    without a MemoryShape, or a GPU the plan has no figures for, is not checked)."""
    try:
        model = planned_model(cfg)
        device = device_for(cfg, None, measure=False)
    except ConfigError:
        return
    if config_memory(cfg, model, device).total <= device.memory:
        return
    device = device_for(cfg, None)  # measured now: the precision auto picks there may make it fit after all
    plan = config_plan(cfg, model, device, price_of(cfg, None))
    if not plan.fits:
        raise ConfigError(refusal(cfg, model, device, plan, layout_allowed(model)))


def plan_command(
    cfg: Config, kind: str | None, price: float | None, search_layouts: bool
) -> tuple[list[str], str | None]:
    """`keel plan`'s output lines, and the one-line refusal when the layout does not fit (or none does)."""
    model = planned_model(cfg)
    check_layout(cfg, model.spec, model.args)  # the mesh, the model's split and the low-precision keys, as keel
    check_low_precision(cfg)  # train's preflight checks them
    device = device_for(cfg, kind)
    plan = config_plan(cfg, model, device, price_of(cfg, price))
    allowed = layout_allowed(model)
    lines = plan_lines(plan, model, cfg.parallel.nnodes, cfg.parallel.nproc)
    if search_layouts:
        found = search(cfg, model, device, plan.price, allowed)
        lines += ["", f"fastest layouts of {plan.setup.world} devices that fit:", *search_table(found)]
        return lines, None if found else refusal(cfg, model, device, plan, allowed)
    return lines, None if plan.fits else refusal(cfg, model, device, plan, allowed)


def worker_plan(cfg: Config, env: DistEnv, framework: float, peak: float | None, bf16: bool) -> Plan | None:
    """The plan of a run on the device it trains on, for its start event; None on a GPU the plan has no figures for
    or for a model without a MemoryShape.

    `framework` is the training process's resident memory before it built its model; on CPU `peak` is the matmul
    ceiling its MFU is measured against, in the precision it trains in (`bf16`: autocast).
    """
    if env.device.type == "cuda":
        device = cuda_device()
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.parallel.nproc))
        device = cpu_device(local, framework, peak or 0.0, peak or 0.0, "autocast" if bf16 else "fp32")
    if device is None:
        return None
    try:
        model = planned_model(cfg)
    except ConfigError:  # a model without a MemoryShape: nothing to plan (its config passed the preflight)
        return None
    return config_plan(cfg, model, device, price_of(cfg, None))
