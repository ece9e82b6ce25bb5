"""`nanoserve sweep`: a two-point grid of real offline benches writes the CSV, JSON and plots with
the documented columns and one offline wandb run per point; points that cannot fit or cannot be
built are skipped with their reason before they start."""
from __future__ import annotations

import csv
import json

import pytest

from server.cli import main
from server.lab.sweep_report import COLUMNS, PLOTS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run_dir(root):
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


def test_two_point_sweep_writes_results_plots_and_wandb_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tmp_path / "grid.yaml"
    config.write_text("models: [random:tiny-gpt2]\nbatch_sizes: [1, 2]\ninput_lens: [12]\noutput_lens: [4]\n"
                      "dtypes: [float32]\n")
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "runs"), "--wandb"]) == 0
    run_dir = _run_dir(tmp_path / "runs")
    with open(run_dir / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert [(r["batch_size"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")]
    for row in rows:
        assert float(row["output_tok_s"]) > 0 and float(row["decode_step_ms"]) > 0
        assert float(row["decode_tok_s"]) == pytest.approx(1000 * int(row["batch_size"]) / float(row["decode_step_ms"]), rel=0.01)
        assert int(row["decode_batch"]) == int(row["batch_size"])  # the decode steps ran at the point's batch
        assert row["kv_bytes_per_token"] == str(2 * 2 * 64 * 4)  # K,V x 2 layers x C=64 x float32
    data = json.loads((run_dir / "results.json").read_text())
    assert [d["label"] for d in data] == [r["label"] for r in rows] and data[0]["params_m"] > 0
    for plot in PLOTS:
        assert (run_dir / plot).stat().st_size > 1000
    runs = sorted(p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-"))
    assert len(runs) == 3  # one per point + the summary
    assert "random:tiny-gpt2 float32 b2 in12 out4" in capsys.readouterr().out


def test_points_that_cannot_run_are_skipped_with_a_reason(tmp_path, capsys):
    assert main(["sweep", "--models", "random:gpt2-xl,random:tiny-qwen2", "--overrides", "none",
                 "--overrides", "kv_heads=3", "--batch-sizes", "1", "--input-lens", "8", "--output-lens", "2",
                 "--memory-limit", "2GiB", "--out", str(tmp_path)]) == 0
    rows = json.loads((_run_dir(tmp_path) / "results.json").read_text())
    status = {(r["model"], r["overrides"]): (r["status"], r["reason"]) for r in rows}
    assert status[("random:gpt2-xl", "")][0] == "skipped" and "2.0 GiB available" in status[("random:gpt2-xl", "")][1]
    assert "needs ~" in status[("random:gpt2-xl", "")][1]
    assert status[("random:gpt2-xl", "kv_heads=3")] == ("skipped", "unknown knob 'kv_heads' for gpt2 models; choose from "
                                                      "heads, hidden, layers, max_positions, vocab")
    assert status[("random:tiny-qwen2", "kv_heads=3")][1].startswith("kv_heads=3: must divide heads (4)")
    assert status[("random:tiny-qwen2", "")][0] == "ok"
    assert not list((_run_dir(tmp_path) / "points").glob("000.*"))  # the skipped point never started


def test_bad_grids_are_refused(tmp_path, capsys):
    assert main(["sweep", "--batch-sizes", "1"]) == 2
    assert "at least one model" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [random:tiny-gpt2]\nbatch: [1]\n")
    assert main(["sweep", "--config", str(bad)]) == 2
    assert "unknown key(s)" in capsys.readouterr().err
