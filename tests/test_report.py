"""`keel report`: the run's front page, rendered in a real headless Chromium and checked as a person would see it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy
import pytest

from browser import coloured_pixels, render
from conftest import run_keel, tiny_config
from keel.cli import main as keel_main
from keel.observe.report import render as report_page
from keel.observe.report_series import thin
from keel.observe.report_timeline import counts, timeline

# A rollback (a loss spike at step 10 sends the run back to its checkpoint of step 8, undoing step 9), then a
# skipped non-finite step.
FAULTS = "spike:step=10, nan:step=11"
EVAL = {
    "format": "keel-eval/1",
    "step": 12,
    "time": "2026-11-25T19:40:02Z",
    "checkpoint": "/x/step_12",
    "dataset": "/x",
    "manifest_sha256": "",
    "seq_len": 32,
    "samples": 32,
    "tokens": 1024,
    "val_loss": 3.9,
    "val_ppl": 49.4,
    "sources": [
        {"name": "*.txt", "glob": "/c/*.txt", "tokens": 400, "val_loss": 3.7, "val_ppl": 40.4},
        {"name": "*.jsonl", "glob": "/c/*.jsonl", "tokens": 624, "val_loss": 4.03, "val_ppl": 56.3},
    ],
    "mixture": [],
    "harness": {
        "lm_eval": "0.4.13",
        "limit": None,
        "tasks": {"keel_python_syntax": {"samples": 40, "acc": 0.55, "acc_stderr": 0.08}},
    },
}
# What the energy meter (docs/cards.md) and the planner leave in events.jsonl, as they write it.
LATER_EVENTS = [
    {
        "event": "power_source",
        "rank": 0,
        "host": "vm",
        "device": "cpu",
        "method": "rated",
        "estimate": True,
        "watts": 6.0,
    },
    {
        "event": "plan",
        "step": 0,
        "host": "vm",
        "device": "cpu",
        "layout": "1 process",
        "step_time_s": 0.5,
        "tokens_per_s": 500.0,
        "memory_rss_gb": 0.4,
        "device_hours": 0.004,
    },
    {
        "event": "energy",
        "step": 12,
        "host": "vm",
        "energy_kwh": 0.00012,
        "energy_estimated_kwh": 0.00012,
        "device_hours": 0.01,
        "power_w": 6.0,
        "final": "finished",
    },
]
AUDIT = {
    "format": "keel-audit/1",
    "step": 12,
    "time": "2026-11-25T19:43:49Z",
    "checkpoint": "/x/step_12",
    "templates": "/t.txt",
    "templates_sha256": "bdc891aa00",
    "score": "mean log-likelihood",
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
            "axis": "age",
            "templates": 20,
            "sentences": 120,
            "groups": {"young": -5.2, "old": -5.6},
            "highest": "young",
            "lowest": "old",
            "gap": 0.4,
            "gap_ci95": [0.2, 0.61],
            "pairs": [{"groups": ["young", "old"], "difference": 0.4, "ci95": [0.2, 0.61]}],
        },
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, dataset) -> Path:
    """A short real run with a rollback and a skipped step."""
    root = tmp_path_factory.mktemp("report")
    config = tiny_config(
        root / "c.toml",
        dataset,
        train={"steps": 12, "eval_every": 4},
        checkpoint={"every": 4},
        resilience={"inject": FAULTS, "spike_window": 4},
    )
    trained = run_keel("train", str(config), cwd=root)
    assert trained.returncode == 0, trained.stderr
    return root / "runs" / "tiny"


def test_report_tells_incidents_in_sentences_and_leaves_out_what_the_run_lacks(run):
    page = report_page(run)
    assert '<span class="state state-finished">finished</span>' in page and "step 12 of 12 (100%)" in page
    incidents = page.split('<section id="incidents">')[1].split("</section>")[0]
    for sentence in (
        "Training started on 1 process (cpu).",
        "Step 10: loss spiked to ",
        "Rolled back from step 10 to the checkpoint of step 8 (loss spike ",
        "Step 11: non-finite loss or gradient (gradient norm nan), 1 in a row; no rank applied the update.",
        "Finished at step 12, 3,072 tokens seen.",
    ):
        assert sentence in incidents, sentence
    assert "{" not in incidents  # sentences, not JSON
    assert "3 warnings" in page and "1 rollback, 1 non-finite step" in page
    data = json.loads(page.split('id="keel-data">')[1].split("</script>")[0])
    loss = next(p for p in data["panels"] if p["id"] == "loss")
    assert [s["name"] for s in loss["series"]] == ["loss", "val_loss", "loss (undone)"]
    assert None in loss["series"][0]["y"]  # step 11's NaN: a gap in the line, not a number
    assert None not in loss["series"][1]["y"]  # one attempt: its validations, from step 0 on, are one line
    assert data["axes"]["tokens"][-1] == 12 * 8 * 32 and len(data["axes"]["step"]) == len(data["axes"]["time"])
    recorded = {name for line in (run / "metrics.jsonl").read_text().splitlines() for name in json.loads(line)}
    plotted = {s["name"] for p in data["panels"] for s in p["series"]}
    assert recorded - plotted == {"step", "time", "tokens_seen", "eta_s"}  # every metric has a plot
    assert "model card" in page  # every run writes its own card when it ends
    # Validation per source of the dataset (*.txt and *.jsonl files), from its lineage.
    assert 'id="validation"' in page and {"val_loss/*.txt", "val_ppl/*.jsonl"} <= plotted
    assert 'id="plan"' in page  # every run logs its plan when it starts
    for absent in ('id="audit"', "data card", ">evaluation<"):
        assert absent not in page  # no audit metrics, eval.json, audit.json or data card in this run


def test_report_renders_in_chromium_with_every_plot_drawn(run, dataset, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    config = (copy / "config.toml").read_text()
    (copy / "config.toml").write_text(config.replace(f'"{dataset}"', f'"{data}"'))
    (data / "data_card.md").write_text("# data\n")
    (copy / "eval.json").write_text(json.dumps(EVAL))
    (copy / "audit.json").write_text(json.dumps(AUDIT))
    start = json.loads((copy / "events.jsonl").read_text().splitlines()[0])["time"]
    with (copy / "events.jsonl").open("a") as events:
        events.writelines(json.dumps({"time": start + k, **e}) + "\n" for k, e in enumerate(LATER_EVENTS))
    with pytest.raises(SystemExit) as done:
        keel_main(["report", str(copy)])
    assert done.value.code == 0 and "report.html" in capsys.readouterr().out
    page = (copy / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//|url\((?!#)|@import""", page)  # nothing from outside

    shown = render(copy / "report.html", tmp_path)
    print(f"screenshot: {shown.screenshot}")
    assert shown.seen == []
    assert len(shown.panels) >= 10 and set(shown.modes) == {"step", "tokens", "time"}
    assert shown.tips == len(shown.panels)
    for figure, box in shown.panels.items():
        assert box is not None, f"{figure} has no plot"
        for mode, drawn in shown.modes.items():
            assert drawn[figure] > 0, f"{figure} draws nothing against {mode}"
        strong, spread = coloured_pixels(shown.screenshot, box)
        assert strong >= 20 and spread > 3, (
            f"{figure}: plot area blank in the screenshot ({strong} px, sd {spread:.1f})"
        )
    text = re.sub(r"<[^>]+>", " ", shown.dom)
    for words in (
        "Bias audit",
        "gender",
        "young over old by 0.4",
        "*.jsonl",
        "4.0300",
        "keel_python_syntax",
        "acc 0.55 ± 0.08",
        "Rolled back from step 10",
        "0.02 USD",
        "0.01 device-hours x 2 USD",
        "0.00012 kWh",
        "0.0576 g CO2e at 480 g/kWh",
        "rated on cpu (an estimate from rated power)",
        "Planned against measured",
        "layout: 1 process",
        "step_time_s",
        "how measured",
    ):
        assert words in text, words
    links = dict((label, href) for href, label in re.findall(r'<a href="([^"#]+)">([^<]+)</a>', page))
    assert set(links) >= {"config", "model card", "evaluation", "bias audit", "data card (data)"}
    assert all((copy / href).resolve().is_file() for href in links.values())


def test_report_refuses_results_files_it_cannot_read_in_one_line(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "eval.json").write_text('{"format": "keel-eval/1", "step": ')
    for bad, fragments in (
        ("eval.json", ("eval.json: not valid JSON", "rerun `keel eval")),
        ("audit.json", ("audit.json: axes.0.gap: Field required", "rerun `keel audit")),
    ):
        if bad == "audit.json":
            (copy / "eval.json").unlink()
            broken = json.loads(json.dumps(AUDIT))
            del broken["axes"][0]["gap"]
            (copy / "audit.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit) as done:
            keel_main(["report", str(copy)])
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1 and all(f in err[0] for f in fragments), err
    assert not (copy / "report.html").exists()


def test_thinning_keeps_every_spike_and_gap():
    values = numpy.sin(numpy.arange(100_000) / 50)
    values[31_337], values[77_777] = 50.0, numpy.nan
    kept = thin(values, limit=1000)
    assert len(kept) <= 1100 and 31_337 in kept and 77_777 in kept
    assert kept[0] == 0 and kept[-1] == 99_999 and list(kept) == sorted(kept)
    assert list(thin(values[:900], limit=1000)) == list(range(900))  # a short series is drawn whole


def test_timeline_tells_stops_failures_hangs_stragglers_and_preemptions(tmp_path):
    events = [  # as runs write them (tests/test_resilience.py and the soak make each)
        {"time": 5.0, "event": "stop", "host": "vm", "step": 6, "reason": "train.stop_after"},
        {"time": 8.0, "event": "resume", "host": "vm", "step": 6, "world_size": 2, "metrics_rolled_back": 0},
        {"time": 8.1, "event": "start", "host": "vm", "step": 6, "world_size": 2, "device": "cpu"},
        {
            "time": 10.0,
            "event": "worker_failed",
            "host": "vm",
            "rank": 1,
            "exit": "signal SIGKILL",
            "exit_code": -9,
            "step": 17,
            "phase": "step start",
            "log": str(tmp_path / "logs" / "rank1.log"),
        },
        {"time": 11.0, "event": "restart", "host": "vm", "attempt": 1, "world_size": 2},
        {
            "time": 20.0,
            "event": "hang",
            "host": "vm",
            "rank": 0,
            "step": 30,
            "phase": "forward",
            "stuck_s": 20.0,
            "frozen_ranks": [1],
            "log": str(tmp_path / "logs" / "rank0.log"),
        },
        {
            "time": 30.0,
            "event": "straggler",
            "host": "vm",
            "step": 40,
            "rank": 1,
            "rank_host": "vm",
            "slowdown": 1.678,
            "cause": "slow device",
        },
        {"time": 31.0, "event": "checkpoint", "host": "vm", "step": 40},
        {"time": 40.0, "event": "stop", "host": "vm", "step": 44, "reason": "preempted (SIGTERM)"},
        {"time": 41.0, "event": "checkpoint_corrupt", "host": "vm", "step": 44, "error": "size mismatch"},
        {"time": 42.0, "event": "novel_thing", "host": "vm", "answer": 42},
    ]
    told = timeline(events, tmp_path)
    assert [(i.kind, i.severity) for i in told] == [
        ("stop", "info"),
        ("resume", "info"),
        ("worker_failed", "failure"),
        ("restart", "info"),
        ("hang", "failure"),
        ("straggler", "warning"),
        ("preemption", "warning"),
        ("checkpoint_corrupt", "failure"),
        ("novel_thing", "info"),
    ]
    assert [i.text for i in told] == [
        "Stopped at step 6: train.stop_after.",
        "Resumed from the checkpoint of step 6.",
        "Rank 1 died (signal SIGKILL) at step 17, in step start; its log: logs/rank1.log.",
        "The workers were restarted (attempt 1, 2 processes).",
        "Rank 0 hung in forward at step 30 for 20.0 s; frozen ranks [1]; every thread's stack is in logs/rank0.log.",
        "Step 40: rank 1 on vm ran 1.678x the median (slow device).",
        "Preempted by SIGTERM at step 44; a checkpoint of the step was committed.",
        "The checkpoint of step 44 failed verification (size mismatch); the one before it was used.",
        "Novel thing: answer 42.",
    ]
    assert counts(told) == (
        "3 failures, 2 warnings",
        "1 worker failure, 1 restart, 1 hang, 1 preemption, 1 straggler report, 1 corrupt checkpoint",
    )


def test_report_of_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        keel_main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "no metrics.jsonl records" in err[0], err


def test_the_browser_check_sees_a_plot_that_fails_to_draw(run, tmp_path):
    page = tmp_path / "report.html"
    good = report_page(run)
    payload = good.split('id="keel-data">')[1].split("</script>")[0]
    data = json.loads(payload)
    next(p for p in data["panels"] if p["id"] == "lr")["series"][0]["y"] = None  # a panel whose data are broken
    page.write_text(good.replace(payload, json.dumps(data)))
    shown = render(page, tmp_path, screenshot=False)
    assert shown.panels["panel-lr"] is None and shown.panels["panel-loss"] is not None
    assert any("panel lr" in line for line in shown.seen), shown.seen
    assert "This plot could not be drawn" in shown.dom
