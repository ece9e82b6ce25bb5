"""scripts/gpu_check.sh stays runnable while nobody has a GPU: it parses, every flag it hands
`nanoserve bench` still exists, its summary reads eager and graph runs, and its CPU dry run
(DRY=cpu: the same steps, tiny) runs end to end."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from server.cli import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" / "gpu_summary.py")
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_bench_flag_exists():
    """The flags in bench_once(), except --enforce-eager, which the script asks the help for first."""
    body = re.search(r"^bench_once\(\) \{[^\n]*\n(.*?)^\}", SCRIPT.read_text(), re.S | re.M).group(1)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", body)) - {"--enforce-eager"}
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert {"--baseline", "--json", "--kv-cache-memory"} <= flags
    assert not {f for f in flags if f not in help_text.getvalue()}, "flags nanoserve bench no longer has"


def result(name: str, tok_s: float, **extra) -> dict:
    return dict(name=name, output_tokens_per_s=tok_s, extra=extra)


def test_summary_rows_and_targets(tmp_path):
    """Graph rows borrow HF from the eager run of the same model and size; the 5x line uses the
    best HF batch of any run."""
    engine = dict(decode_batch=1, decode_step_ms=5.0, step_read_mb=3200.0, achieved_read_gbps=640.0,
                  measured_read_gbps=4000.0, memory_roofline_fraction=0.16)
    files = {"random_gpt2-xl__n1__eager": [result("nanoserve", 200, **engine),
                                            result("hf generate (batch 1)", 50, output_tok_s_by_batch_size={"1": 50})],
             "random_gpt2-xl__n1__graphs": [result("nanoserve", 400, **engine)],
             "random_gpt2-xl__n256__eager": [result("nanoserve", 9000, **engine),
                                              result("hf generate (batch 256)", 3000,
                                                     output_tok_s_by_batch_size={"64": 1500, "256": 3000})]}
    for stem, results in files.items():
        (tmp_path / f"{stem}.json").write_text(json.dumps(results))
    text = gpu_summary.summarize(gpu_summary.load_runs(tmp_path))
    assert "| random:gpt2-xl | 1 | graphs | 400 | 1 | 5.0 | 3200.0 | 640.0 | 4000.0 | 0.16 | 50 (batch 1) | 8.00 |" in text
    assert "= 3.00x HF generate's best (3000 tok/s, batch 256 of 256 prompts)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's stand-in for scripts/gpu_check.sh")
def test_cpu_dry_run(tmp_path):
    """About 35 s on two cores: the skipped GPU tests say why, the bench runs against HF, the
    summary has a row per run, the JSONs come back packed."""
    env = dict(os.environ, DRY="cpu", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "no CUDA device: run scripts/gpu_check.sh on a GPU machine" in log
    assert "=== CUDA graphs: " in log and "=== all steps passed" in log
    summary = (tmp_path / "summary.md").read_text()
    assert "| random:gpt2 | 1 | eager |" in summary and "| random:gpt2 | 2 | eager |" in summary
    with tarfile.open(tmp_path / "bench.tgz") as tar:
        names = sorted(Path(n).name for n in tar.getnames() if n.endswith(".json"))
    assert names == ["random_gpt2__n1__eager.json", "random_gpt2__n2__eager.json"]
