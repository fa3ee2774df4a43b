"""Model and data cards drawn from real runs and datasets; the energy meter's estimate path end to end."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from conftest import assert_one_line_error, read_metrics, run_keel, synthetic_corpus, tiny_config
from keel.checkpoint.inference import load_model
from keel.checkpoint.safe_load import read_metadata
from keel.config import CardConfig
from keel.config_toml import load_config
from keel.data.dataset import TokenDataset
from keel.data.licenses import hf_license, restriction, terms
from keel.data.prepare import prepare_dataset
from keel.data.stages import StageSettings
from keel.distributed.env import DistEnv
from keel.errors import ConfigError, KeelError
from keel.io import read_jsonl
from keel.observe.card import CardWriter, model_card, write_model_card, yaml_lines
from keel.observe.energy import co2e_kg, cost
from keel.observe.power import rapl_zones
from keel.rundir import RunDir
from keel.train.preflight import check_same_run

GERMAN = "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft ruhig auf dem warmen Sofa."


@pytest.fixture(scope="module")
def licensed(tmp_path_factory):
    """A dataset with an MIT and a CC-BY-NC source, German documents, an e-mail address and a duplicate."""
    root = tmp_path_factory.mktemp("cards")
    corpus = synthetic_corpus(root / "corpus")
    for i in range(12):
        (corpus / f"de{i}.txt").write_text(f"{GERMAN} Nummer {i}.", encoding="utf-8")
    (corpus / "mail.txt").write_text("write to jane.doe@example.org about the model", encoding="utf-8")
    (corpus / "copy.txt").write_text((corpus / "doc0000.txt").read_text(), encoding="utf-8")
    sources = [str(corpus / "*.txt"), str(corpus / "*.jsonl")]
    licenses = {sources[0]: "MIT", sources[1]: "CC-BY-NC-4.0"}
    stages = StageSettings(dedup_exact=True, pii=True)
    prepare_dataset(
        sources, root / "data", vocab_size=512, val_fraction=0.1, licenses=licenses, stages=stages, log=print
    )
    return root


@pytest.fixture(scope="module")
def run(licensed):
    """Two processes train 3 steps and stop (as a preemption would), then resume to 6: a run of two attempts."""
    card = {"license": "apache-2.0", "intended_use": "Testing Keel's cards."}
    config = tiny_config(
        licensed / "run.toml",
        licensed / "data",
        train={"steps": 6, "eval_every": 3},
        checkpoint={"every": 3},
        parallel={"nproc": 2},
        card=card,
    )
    first = run_keel("train", str(config), "--set", "train.stop_after=3", cwd=licensed)
    assert first.returncode == 0, first.stdout + first.stderr
    directory = licensed / "runs" / "tiny"
    second = run_keel("train", "--resume", str(directory), cwd=licensed)
    assert second.returncode == 0, second.stdout + second.stderr
    return directory


def energy_events(run_dir):
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "energy"]


def test_energy_is_recorded_per_logged_step_summed_over_ranks_and_continued_across_a_resume(run):
    records = [r for r in read_metrics(run) if "energy_kwh" in r]
    sources = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "power_source"]
    assert len(sources) == 4  # 2 ranks x 2 attempts
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    if rapl_zones():  # a machine whose counters are readable: measured, nothing estimated
        assert not any(s["estimate"] for s in sources)
        assert all(r["energy_estimated_kwh"] == 0 for r in records)
    else:  # this machine (no /sys/class/powercap): the rated estimate, and labelled so
        assert all(s["estimate"] for s in sources)
        watts = sum(s["watts"] for s in sources[-2:])
        for r in records:
            assert r["power_w"] == pytest.approx(watts)  # a constant estimate: every window's mean is the rating
            assert r["energy_estimated_kwh"] == r["energy_kwh"]
            # Constant power per rank: energy = rated watts x each rank's time in the loop, summed.
            assert r["energy_kwh"] == pytest.approx(watts / 2 * r["device_hours"] / 1000, rel=1e-9)
    totals = [r["energy_kwh"] for r in records]
    assert totals == sorted(totals) and totals[0] > 0
    stop, finish = energy_events(run)
    assert stop["final"] == "stopped" and finish["final"] == "finished"
    # The resumed attempt continues the run's totals (the stop's final figure), not from zero.
    assert records[3]["energy_kwh"] > stop["energy_kwh"] >= records[2]["energy_kwh"]
    keys = read_metadata(run / "checkpoints" / "step_3").state_dict_metadata
    assert {"energy.energy_kwh", "energy.device_hours"} <= set(keys)


def card_value(card: str, row: str) -> str:
    return re.search(rf"^\| {row} \| (.+) \|$", card, re.M).group(1)


def test_a_finished_run_writes_a_model_card_whose_totals_are_the_metrics(run, licensed):
    card = (run / "model_card.md").read_text()
    finish = energy_events(run)[-1]
    kwh, hours = finish["energy_kwh"], finish["device_hours"]
    assert kwh >= max(r["energy_kwh"] for r in read_metrics(run) if "energy_kwh" in r)
    how = "measured" if rapl_zones() else "an estimate from rated power"
    assert card_value(card, "energy").startswith(f"{kwh:.6g} kWh ({how})")
    assert card_value(card, "device-hours").startswith(f"{hours:.6g} h")
    assert card_value(card, "CO2e").startswith(f"{co2e_kg(kwh, 480.0):.6g} kg ({kwh:.6g} kWh x 480 g/kWh")
    assert card_value(card, "cost").startswith(f"{cost(hours, 2.0):.6g} USD ({hours:.6g} device-hours x 2 USD")
    assert card_value(card, "tokens").startswith(f"{6 * 8 * 32:,} (6 steps")
    params = int(card_value(card, "parameters").split("(")[1].rstrip(")").replace(",", ""))
    assert params == sum(p.numel() for p in load_model(run)[0].parameters())  # the trained model's own count
    assert card_value(card, "hardware").startswith("2 x ")
    assert card_value(card, "steps") == "6 of 6 (run finished)"
    assert card_value(card, "precision") == "fp32 on cpu"
    assert card_value(card, "parallel layout").startswith("2 processes (dp_replicate 1 x dp_shard 2 x tp 1: ")
    assert re.search(r"^\| goodput \| \d+\.\d% ", card, re.M)
    assert "forbids commercial use" in card and "allows commercial use that a data source forbids" in card
    assert "*.txt` (MIT)" in card and "## Intended use\n\nTesting Keel's cards." in card
    assert "not evaluated (no `eval.json`" in card and "Not audited (no `audit.json`" in card
    assert "Not stated (set card.limitations)." in card
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert f"| 6 | {val[-1]:.4f} | {math.exp(val[-1]):.2f} |" in card


def test_export_ships_the_card_as_a_readme_that_huggingface_hub_loads(run, tmp_path):
    from huggingface_hub import ModelCard

    result = run_keel("export", str(run), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    card = ModelCard.load(tmp_path / "hf" / "README.md", ignore_metadata_errors=False)
    assert card.data.license == "apache-2.0" and card.data.datasets == ["data"]
    assert card.data.library_name == "transformers" and card.data.metrics == ["loss", "perplexity"]
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["loss"].metric_value == round(val, 4) and results["loss"].dataset_split == "val"
    kwh = energy_events(run)[-1]["energy_kwh"]
    assert card.data.co2_eq_emissions["emissions"] == pytest.approx(kwh * 480.0, rel=1e-5)  # grams
    assert "# tiny" in card.text and "## Energy, emissions and cost" in card.text


def eval_record(run, step: int) -> dict:
    """An eval.json as `keel eval` writes it (keel-eval/1), with the validation loss training logged at `step`."""
    loss = next(r["val_loss"] for r in read_metrics(run) if r.get("val_loss") is not None and r["step"] == step)
    config = load_config(run / "config.toml")
    source = {"name": "*.txt", "glob": "/corpus/*.txt", "tokens": 1000, "val_loss": loss + 0.1}
    source["val_ppl"] = math.exp(source["val_loss"])
    empty = {"name": "*.jsonl", "glob": "/corpus/*.jsonl", "tokens": 0, "val_loss": None, "val_ppl": None}
    tasks = {"keel_python_syntax": {"samples": 40, "acc": 0.275, "acc_stderr": 0.0715, "acc_norm": 0.3}}
    return {
        "format": "keel-eval/1",
        "step": step,
        "time": "2026-11-25T19:40:02Z",
        "checkpoint": str(run / "checkpoints" / f"step_{step}"),
        "dataset": config.data.dataset,
        "manifest_sha256": config.data.manifest_sha256,
        "seq_len": 32,
        "samples": 32,
        "tokens": 1024,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "sources": [source, empty],
        "mixture": [],
        "harness": {"lm_eval": "0.4.13", "limit": None, "tasks": tasks},
        "a_later_field": "ignored",
    }


AUDIT = {
    "format": "keel-audit/1",
    "step": 6,
    "time": "2026-11-25T19:43:49Z",
    "checkpoint": "/abs/runs/tiny/checkpoints/step_6",
    "templates": "/abs/src/keel/eval/audit/templates.txt",
    "templates_sha256": "bdc891" + "0" * 58,
    "score": "mean log-likelihood per token (nats) of the words after the term",
    "bootstrap": 1000,
    "seed": 0,
    "axes": [
        {
            "axis": "gender",
            "templates": 36,
            "sentences": 576,
            "groups": {"female": -5.91618, "male": -5.91660},
            "highest": "female",
            "lowest": "male",
            "gap": 0.00042,
            "gap_ci95": [0.00003, 0.00113],
            "pairs": [{"groups": ["female", "male"], "difference": 0.00042, "ci95": [-0.00027, 0.00113]}],
        },
        {
            "axis": "religion",
            "templates": 30,
            "sentences": 600,
            "groups": {"a": -5.1, "b": -5.3},
            "highest": "a",
            "lowest": "b",
            "gap": 0.2,
            "gap_ci95": [0.1, 0.3],
            "pairs": [{"groups": ["a", "b"], "difference": 0.2, "ci95": [0.1, 0.3]}],
        },
    ],
}


def test_keel_card_reads_eval_and_audit_results_and_records_the_keys_it_is_given(run, tmp_path):
    from huggingface_hub import ModelCard

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    evaluation = eval_record(copy, 6)
    (copy / "eval.json").write_text(json.dumps(evaluation))
    (copy / "audit.json").write_text(json.dumps(AUDIT))
    result = run_keel(
        "card", str(copy), "--set", "card.license=cc-by-nc-4.0", "--set", "card.limitations=Six steps.", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (copy / "model_card.md").read_text()
    loss = evaluation["val_loss"]
    assert f"| all |  | {loss:.4f} | {math.exp(loss):,.2f} | 1,024 |" in text
    assert f"| source `*.txt` | `/corpus/*.txt` | {loss + 0.1:.4f} | {math.exp(loss + 0.1):,.2f} | 1,000 |" in text
    assert "| source `*.jsonl` | `/corpus/*.jsonl` | not evaluated (no tokens) |  | 0 |" in text
    assert "| keel_python_syntax | acc | 0.2750 | 0.0715 | 40 |" in text
    assert "| keel_python_syntax | acc_norm | 0.3000 |  | 40 |" in text
    assert "| gender | 0.0004 | [0.0000, 0.0011] | female | male | 36 |" in text
    assert "excludes zero (a preference that holds across the templates): religion: a over b by 0.2000" in text
    assert "gender: female over male" not in text  # its pair's interval contains zero
    assert "## Limitations\n\nSix steps." in text
    assert "allows commercial use that a data source forbids" not in text  # a non-commercial model is consistent
    assert 'limitations = "Six steps."' in (copy / "config.toml").read_text()  # kept for every later card
    data = ModelCard(text, ignore_metadata_errors=False).data
    assert data.license == "cc-by-nc-4.0"
    found = {(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results}
    assert ("data (held-out split)", "loss", float(f"{loss:.6g}")) in found
    assert ("data: *.txt", "loss", float(f"{loss + 0.1:.6g}")) in found
    assert ("keel_python_syntax", "acc", 0.275) in found and ("keel_python_syntax", "acc_norm", 0.3) in found
    assert not any(name == "data: *.jsonl" for name, _, _ in found)  # no tokens, no figure
    # Training's per-source losses and probe gaps (as a run with them logs them) are shown too, the newest up to step 6.
    with open(copy / "metrics.jsonl", "a") as metrics:
        for step, gap in ((3, 0.5), (6, 0.25), (9, 1.0)):
            record = {"step": step, "time": 0.0, "val_loss/*.txt": gap + 4, "audit_gap/gender": gap}
            metrics.write(json.dumps(record) + "\n")
    text = model_card(copy)
    assert "Per source and mixture dataset at step 6:" in text and "| val_loss | *.txt | 4.2500 |" in text
    assert "During training (`observe.audit_every`, no bootstrap), gaps at step 6: gender 0.2500." in text
    # Results of another checkpoint are shown as such and stay out of the metadata.
    (copy / "eval.json").write_text(json.dumps(eval_record(copy, 3)))
    other = model_card(copy)
    assert "**not the checkpoint this card describes** (step 6)" in other
    data = ModelCard(other, ignore_metadata_errors=False).data
    assert {r.dataset_name for r in data.eval_results} == {"data (held-out split)"}  # training's, of step 6
    val = [r["val_loss"] for r in read_metrics(copy) if "val_loss" in r]
    assert [r.metric_value for r in data.eval_results if r.metric_type == "loss"] == [round(val[-1], 4)]


def test_card_refuses_bad_input_in_one_line(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = eval_record(copy, 6)
    del record["val_loss"]
    (copy / "eval.json").write_text(json.dumps(record))
    config = (copy / "config.toml").read_text()
    malformed = run_keel("card", str(copy), "--set", "card.limitations=x", cwd=tmp_path)
    assert_one_line_error(malformed, "eval.json: malformed", "val_loss", "docs/cards.md")
    assert (copy / "config.toml").read_text() == config  # nothing recorded for a card that was not written
    (copy / "eval.json").unlink()
    # The same one-line errors, in process (the CLI's handling of a KeelError is the one above).
    (copy / "audit.json").write_text(json.dumps({**AUDIT, "format": "keel-audit/2"}))
    with pytest.raises(KeelError, match=r"audit.json: malformed: format: .*keel-audit/1"):
        write_model_card(copy)
    (copy / "audit.json").unlink()
    with pytest.raises(ConfigError, match=r"--set optim.lr: .*card.license"):
        write_model_card(copy, ["optim.lr=1"])
    with pytest.raises(KeelError, match="not a Keel run dir"):
        write_model_card(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    # A run without a committed checkpoint (a crashed save's remains only): no card, and its config untouched.
    shutil.rmtree(copy / "checkpoints")
    (copy / "checkpoints" / "step_3").mkdir(parents=True)
    (copy / "model_card.md").unlink()
    no_model = run_keel("card", str(copy), "--set", "card.limitations=x", cwd=tmp_path)
    assert_one_line_error(no_model, "no committed checkpoint", "keel train --resume")
    assert not (copy / "model_card.md").exists() and (copy / "config.toml").read_text() == config
    export = run_keel("export", str(copy), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert_one_line_error(export, "no committed checkpoint")
    assert not (tmp_path / "hf").exists()


def eos_lengths(dataset, split):
    """Each document's length in tokens, found independently of the index: the distance between EOS tokens."""
    data = TokenDataset(dataset, split)
    eos = np.flatnonzero(data.read(0, data.num_tokens) == data.eos_id)
    return np.diff(np.append(-1, eos))


def test_data_card_is_a_datasheet_drawn_from_the_manifest_and_the_shards(licensed, tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(licensed / "data", dataset)
    result = run_keel("data", "card", str(dataset), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    card = (dataset / "data_card.md").read_text()
    for section in ("Motivation", "Composition", "Collection process", "Preprocessing", "Uses", "Maintenance"):
        assert f"## {section}" in card
    assert "| CC-BY-NC-4.0 | non-commercial | **no** | yes |" in card and "| MIT | permissive | yes | yes |" in card
    assert "forbids commercial use" in card and "MIT (" not in card.split("## Uses")[1]
    assert "| EMAIL | 1 |" in card and "dedup_exact 1" in card
    lengths = eos_lengths(dataset, "train")
    train = card.split("Document length, train split")[1].split("###")[0]
    assert f"median {int(np.quantile(lengths, 0.5, method='lower')):,}, p90 " in train
    assert f"max {lengths.max():,}." in train
    rows = re.findall(r"^\| ([\d,]+)-([\d,]+) \| ([\d,]+) \|", train, re.M)
    assert sum(int(n.replace(",", "")) for _, _, n in rows) == len(lengths)
    for low, high, n in rows:
        low, high = int(low.replace(",", "")), int(high.replace(",", ""))
        assert int(n.replace(",", "")) == ((lengths >= low) & (lengths <= high)).sum()
    languages = card.split("### Language")[1:]
    assert any("| de |" in block for block in languages) and all("| en |" in block for block in languages)
    removed = run_keel("data", "remove", str(dataset), "--source", str(licensed / "corpus" / "de0.txt"), cwd=tmp_path)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    out = tmp_path / "elsewhere.md"
    assert run_keel("data", "card", str(dataset), "--out", str(out), cwd=tmp_path).returncode == 0
    assert re.search(r"^\| \d{4}-\d\d-\d\dT[\d:]+Z \| 1 \| ", out.read_text(), re.M)
    assert_one_line_error(run_keel("data", "card", str(tmp_path / "none"), cwd=tmp_path), "does not exist")


@pytest.mark.parametrize(
    ("tag", "commercial", "redistribution"),
    [
        ("CC-BY-4.0", True, True),
        ("cc-by-sa-4.0", True, True),
        ("CC-BY-NC-4.0", False, True),
        ("CC-BY-NC-SA-3.0", False, True),
        ("CC-BY-ND-4.0", True, False),
        ("CC-BY-NC-ND-4.0", False, False),
        ("MIT", True, True),
        ("Apache-2.0", True, True),
        ("GPL-3.0-or-later", True, True),
        ("CC0-1.0", True, True),
        ("PSF-2.0", True, True),
        ("proprietary", False, False),
        ("unknown", None, None),
        ("my own terms", None, None),
    ],
)
def test_license_table(tag, commercial, redistribution):
    t = terms(tag)
    assert (t.commercial, t.redistribution) == (commercial, redistribution)
    assert (restriction(tag) is None) == (commercial is True and redistribution is True)


def test_hub_license_metadata_and_yaml_round_trip():
    assert hf_license("Apache-2.0") == {"license": "apache-2.0"}
    assert hf_license("My Own Terms") == {"license": "other", "license_name": "my-own-terms"}
    meta = {"license": "mit", "tags": ["a", "b"], "empty": [], "n": 0, "x": 1.5, "s": 'quote " and: colon'}
    meta["model-index"] = [
        {"name": "m", "results": [{"task": {"type": "t"}, "metrics": [{"type": "loss", "value": 2.0}]}]}
    ]
    assert yaml.safe_load("\n".join(yaml_lines(meta))) == meta


def test_card_keys_may_change_between_invocations_and_training_keys_may_not(run):
    saved = load_config(run / "config.toml")
    check_same_run(saved, saved.model_copy(update={"card": CardConfig(limitations="Only six steps.")}))
    cheaper = saved.model_copy(deep=True)
    cheaper.observe.price_per_device_hour = 0.5
    check_same_run(saved, cheaper)
    other = saved.model_copy(deep=True)
    other.optim.lr = 1.0
    with pytest.raises(ConfigError, match="optim.lr"):
        check_same_run(saved, other)


def test_a_run_ending_with_a_bad_eval_file_warns_and_a_changed_dataset_is_flagged(run, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model_card.md").unlink()
    (copy / "eval.json").write_text("{not json")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    CardWriter(RunDir(copy), env).on_exit("finished")  # the training result stands: no exception
    assert not (copy / "model_card.md").exists() and "model card not written" in caplog.text
    (copy / "eval.json").unlink()
    config = (copy / "config.toml").read_text()
    recorded = load_config(copy / "config.toml").data.manifest_sha256
    (copy / "config.toml").write_text(config.replace(recorded, "0" * 64))  # as if trained on an earlier version
    assert "has changed since the run started" in model_card(copy)
