"""The model card: RUN_DIR/model_card.md, Hugging Face model-card metadata (YAML) plus Markdown, drawn from the run.

Written by every run when it ends and by `keel card RUN_DIR`; `keel export --format hf` ships it as README.md.
docs/cards.md says where each field comes from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from keel.callback import Callback
from keel.checkpoint.commit import committed_steps
from keel.config import Config, ObserveConfig
from keel.config_toml import apply_overrides, build_config, parse_override, read_toml, save_config
from keel.data.card import license_flags, summary_lines, table
from keel.data.licenses import hf_license, normalize, terms
from keel.distributed.env import DistEnv
from keel.distributed.mesh import resolve_layout
from keel.errors import ConfigError, KeelError
from keel.io import atomic_write_text, filesystem_errors
from keel.models import get_model_spec
from keel.observe.card_facts import RunFacts, gather
from keel.observe.card_results import audit_lines, evaluation_lines, model_index_results
from keel.observe.energy import co2e_kg, cost
from keel.resilience.goodput import CATEGORIES, goodput_ratio
from keel.rundir import RunDir

log = logging.getLogger("keel")
# The defaults of the two prices, so the card can say a figure rests on a default rather than the user's own.
DEFAULTS = {key: ObserveConfig.model_fields[key].default for key in ("price_per_device_hour", "grid_gco2_per_kwh")}


def _scalar(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "null"
    return json.dumps(value)  # JSON's scalars are YAML's: quoted strings, numbers, true/false/null


def yaml_lines(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML for dicts, lists and JSON scalars (all a model card's metadata needs)."""
    pad, lines = "  " * indent, []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        head = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, (dict, list)) and item:
            sub = yaml_lines(item, indent + 1)
            if isinstance(value, dict):
                lines += [head, *sub]
            else:  # a list item's first key goes on the dash's line; the rest line up under it
                lines += [f"{head} {sub[0].lstrip()}", *sub[1:]]
        else:
            lines.append(f"{head} {'[]' if item == [] else '{}' if item == {} else _scalar(item)}")
    return lines


def _span(seconds: float) -> str:
    """A duration as people read it: 1h02m, 5m03s, 12.3 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s" if seconds >= 60 else f"{seconds:.1f} s"


def _model_index(f: RunFacts) -> list[dict[str, Any]]:
    name = Path(f.cfg.data.dataset).name  # validation is always on data.dataset
    if f.evaluation is not None and f.evaluation.step == f.step:  # `keel eval` of this very checkpoint
        results = model_index_results(f.evaluation, name)
    elif f.val_loss:  # else training's last validation of it
        step, loss = f.val_loss[-1]
        dataset = {"name": f"{name} (held-out split)", "type": name, "split": "val"}
        metrics = [
            {"type": "loss", "value": round(loss, 4), "name": f"validation loss at step {step}"},
            {"type": "perplexity", "value": round(math.exp(min(loss, 700)), 3), "name": "validation perplexity"},
        ]
        results = [{"task": {"type": "text-generation"}, "dataset": dataset, "metrics": metrics}]
    else:
        results = []
    return [{"name": f.cfg.run.name, "results": results}] if results else []


def _hardware(f: RunFacts) -> str:
    groups = Counter((e.get("device", "?"), e.get("method", "?")) for e in f.power_sources)
    return ", ".join(f"{n} x {device}" for (device, _), n in groups.items()) or f"{f.world_size} processes"


def metadata(f: RunFacts) -> dict[str, Any]:
    """The Hugging Face model-card metadata: license, datasets, metrics with values, emissions."""
    index = _model_index(f)
    meta: dict[str, Any] = hf_license(f.cfg.card.license)
    if get_model_spec(f.cfg.model.name).hf is not None:
        meta["library_name"] = "transformers"  # `keel export --format hf` makes it a transformers model
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["keel", "pretraining", f.cfg.model.name]
    meta["datasets"] = [root.name for root, _ in f.datasets]
    meta["metrics"] = sorted({m["type"] for r in index[0]["results"] for m in r["metrics"]}) if index else []
    if f.energy["energy_kwh"] > 0:
        grams = co2e_kg(f.energy["energy_kwh"], f.cfg.observe.grid_gco2_per_kwh) * 1000
        meta["co2_eq_emissions"] = {
            "emissions": float(f"{grams:.6g}"),
            "source": "Keel's energy meter x observe.grid_gco2_per_kwh" + (" (estimate)" if _estimated(f) else ""),
            "training_type": "pre-training",
            "hardware_used": _hardware(f),
        }
    if index:
        meta["model-index"] = index
    return meta


def _estimated(f: RunFacts) -> bool:
    return f.energy["energy_estimated_kwh"] > 0


def _flags(f: RunFacts) -> list[str]:
    flags = [f"data `{root.name}` {m}" for root, m in f.datasets if isinstance(m, str)]
    for root, m in f.datasets:
        flags += [f"data `{root.name}`: {flag}" for flag in ([] if isinstance(m, str) else license_flags(m))]
    model = terms(f.cfg.card.license)
    if model.commercial and any(
        terms(s.license).commercial is False for _, m in f.datasets if not isinstance(m, str) for s in m.sources
    ):
        flags.append(f"the model's license ({f.cfg.card.license}) allows commercial use that a data source forbids")
    if model.commercial is None:
        flags.append(f"the model's license {f.cfg.card.license!r} is unknown: set card.license (e.g. apache-2.0)")
    return flags


def _model_section(f: RunFacts) -> list[str]:
    args = {k: v for k, v in f.cfg.model_section().items() if k != "name"}
    tok = f.tokenizer
    rows = [
        ["architecture", f"{f.cfg.model.name}: " + ", ".join(f"{k} {v}" for k, v in args.items() if v is not None)],
        ["parameters", f"{f.params / 1e6:,.2f} M ({f.params:,})"],
        [
            "tokenizer",
            f"{tok['type']} ({tok['pre_tokenizer']}), {tok['vocab_size']:,} tokens, special {tok['special']}",
        ],
        ["checkpoint", f"step {f.step} (`{f.run.checkpoint(f.step).relative_to(f.run.root)}`)"],
    ]
    return ["## Model", "", *table(["", ""], rows)]


def low_precision_notes(cfg: Config) -> str:
    """What the precision row adds for FSDP2's mixed-precision policy and float8 layers (empty when neither is on)."""
    par, notes = cfg.parallel, ""
    if par.fsdp_param_dtype or par.fsdp_reduce_dtype:
        gather, reduce = par.fsdp_param_dtype or "float32", par.fsdp_reduce_dtype or "float32"
        notes += f", FSDP2 parameters gathered in {gather} and gradients reduced in {reduce} (fp32 master weights)"
    if cfg.train.fp8:
        notes += ", float8 matmuls in the blocks' linear layers (torchao Float8Linear)"
    return notes


def _training_section(f: RunFacts) -> list[str]:
    c = f.cfg
    t, o = c.train, c.optim
    layout = resolve_layout(c.parallel, f.world_size)
    micro = t.micro_batch_size or t.global_batch_size // layout.dp
    dims = "DDP replicas x FSDP2 shards x tensor parallel"
    if layout.pp > 1:
        par = c.parallel
        dims = f"pipeline stages ({par.pp_schedule}, {par.pipeline_microbatches} micro-batches each) x {dims}"
    rows = [
        ["steps", f"{f.step:,} of {t.steps:,} (run {f.state})"],
        ["tokens", f"{f.tokens:,} ({f.step:,} steps x {t.global_batch_size} sequences x {t.seq_len} tokens)"],
        [
            "optimizer",
            f"AdamW, lr {o.lr:g} (warm-up {o.warmup_steps} steps, cosine to {o.min_lr_ratio:g} x), betas "
            f"({o.beta1:g}, {o.beta2:g}), eps {o.eps:g}, weight decay {o.weight_decay:g}, grad clip {t.grad_clip:g}",
        ],
        [
            "precision",
            f"{f.precision} on {f.device_type}" + low_precision_notes(c) + (", torch.compile" if t.compile else ""),
        ],
        [
            "parallel layout",
            f"{f.world_size} processes ({layout.describe()}: {dims}), "
            f"{micro} sequences per micro batch, {t.global_batch_size // (micro * layout.dp)} micro batches per step, "
            f"activation checkpointing {t.activation_checkpointing}",
        ],
        ["hardware", _hardware(f) + f" on {len({e.get('host') for e in f.power_sources}) or '?'} host(s)"],
        ["seed", str(c.run.seed)],
    ]
    if f.ledger is not None:
        held = sum(f.ledger.totals.values()) - f.ledger.totals["idle"]
        parts = ", ".join(f"{k} {_span(f.ledger.totals[k])}" for k in CATEGORIES if f.ledger.totals[k] >= 1)
        rows.append(["wall time", f"{_span(held)} on its machines ({parts})"])
        rows.append(["goodput", f"{goodput_ratio(f.ledger.totals):.1%} (productive time / time on its machines)"])
    else:
        rows.append(["wall time, goodput", "not known (no goodput records in events.jsonl)"])
    return ["## Training", "", *table(["", ""], rows)]


def _energy_section(f: RunFacts) -> list[str]:
    e, obs = f.energy, f.cfg.observe
    lines = ["## Energy, emissions and cost", ""]
    if not f.power_sources and e["energy_kwh"] == 0:
        return lines + ["Not measured: the run predates Keel's energy meter."]
    kwh, hours = e["energy_kwh"], e["device_hours"]
    how = (
        "an estimate from rated power"
        if math.isclose(e["energy_estimated_kwh"], kwh)
        else f"{e['energy_estimated_kwh']:.6g} kWh of it estimated from rated power"
        if _estimated(f)
        else "measured"
    )
    grid = (
        ": the default, about the world mean; set your grid's"
        if obs.grid_gco2_per_kwh == DEFAULTS["grid_gco2_per_kwh"]
        else ""
    )
    price = ": the default; set your price" if obs.price_per_device_hour == DEFAULTS["price_per_device_hour"] else ""
    rows = [
        ["energy", f"{kwh:.6g} kWh ({how})"],
        ["device-hours", f"{hours:.6g} h (each process's time in the training loop, all attempts)"],
        [
            "CO2e",
            f"{co2e_kg(kwh, obs.grid_gco2_per_kwh):.6g} kg ({kwh:.6g} kWh x {obs.grid_gco2_per_kwh:g} g/kWh, "
            f"observe.grid_gco2_per_kwh{grid})",
        ],
        [
            "cost",
            f"{cost(hours, obs.price_per_device_hour):.6g} USD ({hours:.6g} device-hours x "
            f"{obs.price_per_device_hour:g} USD, observe.price_per_device_hour{price})",
        ],
    ]
    lines += table(["", ""], rows)
    sources = Counter((s.get("device"), s.get("method")) for s in f.power_sources)
    lines += [
        "",
        "Power sources, each rank's newest:",
        "",
        *table(["device", "ranks", "method"], [[d, n, m] for (d, m), n in sources.items()]),
    ]
    if f.ledger is not None:
        lines += ["", f"Not metered: start-up and restarts, {_span(f.ledger.totals['startup'])} of wall time."]
    return lines


def _evaluation_section(f: RunFacts) -> list[str]:
    val = [[step, f"{loss:.4f}", f"{math.exp(min(loss, 700)):.2f}"] for step, loss in f.val_loss]
    lines = ["## Evaluation", "", "Validation loss on the dataset's held-out split during training:", ""]
    lines += (
        table(["step", "loss (nats/token)", "perplexity"], val) if val else ["Not evaluated (train.eval_every = 0)."]
    )
    at, parts = f.val_parts
    if parts:
        rows = [[name.split("/", 1)[0], name.split("/", 1)[1], f"{loss:.4f}"] for name, loss in parts.items()]
        lines += ["", f"Per source and mixture dataset at step {at}:", ""]
        lines += table(["metric", "of", "loss (nats/token)"], rows)
    trained_on = f.cfg.data.manifest_sha256
    return lines + ["", *evaluation_lines(f.evaluation, f.run.eval_results, f.step, trained_on)]


def model_card(run_dir: Path, step: int | None = None) -> str:
    """The model card of a run's checkpoint at `step` (the newest when None): metadata block, then Markdown."""
    f = gather(run_dir, step)
    c = f.cfg.card
    lines = ["---", *yaml_lines(metadata(f)), "---", "", f"# {f.cfg.run.name}", ""]
    lines.append(
        f"A {f.params / 1e6:,.1f} M-parameter {f.cfg.model.name} language model pretrained with Keel on {f.tokens:,} "
        f"tokens. Written by Keel on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from `{f.run.root}`; "
        "every figure is drawn from the run dir (docs/cards.md says from where). License: "
        f"{normalize(c.license)} (card.license)."
    )
    flags = _flags(f)
    lines += ["", *(f"> **Flag**: {flag}" + "  " for flag in flags)] if flags else []
    lines += ["", *_model_section(f), "", *_training_section(f), "", *_energy_section(f), ""]
    lines += [*_evaluation_section(f), ""]
    lines += audit_lines(f.audit, f.run.audit_results, f.step, f.audit_gaps[1], f.audit_gaps[0])
    lines += ["", "## Training data", ""]
    for root, m in f.datasets:
        lines += [f"- `{root}` {m}"] if isinstance(m, str) else summary_lines(root, m)
    lines += ["", f"The full datasheet: `keel data card {f.cfg.data.dataset}`."]
    lines += ["", "## Intended use", "", c.intended_use or "Not stated (set card.intended_use)."]
    lines += ["", "## Limitations", "", c.limitations or "Not stated (set card.limitations)."]
    return "\n".join(lines) + "\n"


# What `keel card --set` may change in a run's config: what the card states, nothing that shapes training.
CARD_KEYS = ("card.license", "card.intended_use", "card.limitations", *(f"observe.{k}" for k in DEFAULTS))


def write_model_card(run_dir: Path, overrides: list[str] = ()) -> Path:
    """Write RUN_DIR/model_card.md, first recording `--set` overrides of CARD_KEYS in the run's config; its path."""
    run = RunDir(run_dir)
    gather(run.root)  # before the config changes: a run without a model, or with a malformed eval.json, gets no card
    if overrides:
        for item in overrides:
            key = ".".join(parse_override(item)[0])
            if key not in CARD_KEYS:
                raise ConfigError(
                    f"--set {key}: `keel card` sets only {', '.join(CARD_KEYS)}; other keys belong to the run "
                    "(keel train --resume RUN_DIR --set ...)"
                )
        cfg = build_config(apply_overrides(read_toml(run.config), list(overrides)), str(run.config))
        with filesystem_errors("update the run's config", where=run.config):
            save_config(cfg, run.config)
    text = model_card(run.root)
    with filesystem_errors("write the model card", where=run.model_card):
        atomic_write_text(run.model_card, text)
    return run.model_card


class CardWriter(Callback):
    """Writes the model card when the loop ends with a committed checkpoint (main rank); a failure only warns."""

    def __init__(self, run: RunDir, env: DistEnv):
        self.run, self.env = run, env

    def on_exit(self, state: str) -> None:
        if not self.env.is_main or not committed_steps(self.run.checkpoints):
            return
        try:
            write_model_card(self.run.root)
        except KeelError as e:  # the model trained: a card it cannot write yet (a bad eval.json) must not fail it
            log.warning(f"model card not written: {e}; fix it and run `keel card {self.run.root}`")
