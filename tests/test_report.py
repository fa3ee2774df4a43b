"""`keel report` turns a run dir into one self-contained HTML page of plots with incidents marked."""

from __future__ import annotations

import base64

from conftest import run_keel, tiny_config


def test_report_embeds_plots_and_lists_incidents_of_a_resumed_run(tmp_path, dataset):
    config = tiny_config(tmp_path / "c.toml", dataset, train={"steps": 6, "stop_after": 3, "eval_every": 2})
    assert run_keel("train", str(config), cwd=tmp_path).returncode == 0
    run = tmp_path / "runs" / "tiny"
    assert run_keel("train", "--resume", str(run), "--set", "train.stop_after=100", cwd=tmp_path).returncode == 0
    result = run_keel("report", str(run), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (run / "report.html").read_text()
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) >= 5  # loss, lr, throughput, MFU, step time, memory
    for image in images:
        assert base64.b64decode(image.split('"')[0]).startswith(b"\x89PNG")
    for alt in (
        "Loss",
        "Learning rate",
        "Throughput",
        "Model FLOPs utilisation",
        "Memory",
        "Gradient norm per parameter group",
    ):
        assert f'alt="{alt}"' in page
    assert ">resume<" in page and ">stop<" in page and "finished" in page


def test_report_of_a_directory_without_metrics_is_a_one_line_error(tmp_path):
    result = run_keel("report", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no metrics.jsonl records" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
