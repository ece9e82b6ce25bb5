"""The sweep against a real server (tiny random model on loopback): the run folder is complete and
its throughput agrees with the server's own generation-token counter; failures carry their reason."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

if importlib.util.find_spec("locust") is None:  # looked up, not imported: importing locust
    pytest.skip("locust is not installed", allow_module_level=True)  # gevent-patches this whole process
pytest.importorskip("matplotlib")

from loadtest import sweep  # noqa: E402
from loadtest.launcher import ServerProcess  # noqa: E402

MODEL = "random:tiny-qwen2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(MODEL, "--max-num-seqs 8", log_path=log, startup_timeout_s=120) as s:
        yield s


def test_sweep_writes_csvs_summary_and_plots_that_match_the_server(server, tmp_path):
    tokens_before = sweep.read_counters(server.url)[sweep.GENERATION_COUNTER]
    argv = ["--host", server.url, "--levels", "1,2", "--duration", "3", "--ignore-eos",
            "--output-tokens", "24", "--range-ratio", "0", "--out", str(tmp_path), "--name", "run", "--no-progress"]
    assert sweep.main(argv) == 0
    tokens_after = sweep.read_counters(server.url)[sweep.GENERATION_COUNTER]
    run = tmp_path / "run"
    for name in ("summary.json", "throughput.png", "latency.png", "ttft_distribution.png",
                 "level_001/locust_stats.csv", "level_002/locust_stats_history.csv", "level_002/samples.jsonl"):
        assert (run / name).stat().st_size > 0, name

    levels = json.loads((run / "summary.json").read_text())["levels"]
    assert [lv["users"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["num_errors"] == 0 and lv["num_requests"] > 0
        assert lv["mean_output_tokens"] == 24                       # ignore_eos + fixed max_tokens
        assert 0 < lv["ttft_ms_p50"] <= lv["ttft_ms_p90"] <= lv["ttft_ms_p99"] <= lv["e2e_ms_p99"]
        assert 0 < lv["itl_ms_p50"] <= lv["itl_ms_p99"]
        assert 0 < lv["tpot_ms_p50"] <= lv["tpot_ms_p99"] and lv["server_spec_acceptance"] is None
        assert lv["server_output_tokens_per_s"] == pytest.approx(lv["output_tokens_per_s"], rel=0.10)
    client_tokens = sum(lv["output_tokens_per_s"] * lv["duration_s"] for lv in levels)
    assert client_tokens == pytest.approx(tokens_after - tokens_before, rel=0.10)
    assert "wandb" not in sys.modules


def test_failed_requests_are_counted_with_their_reason(server, tmp_path):
    argv = ["--host", server.url, "--levels", "1", "--duration", "10", "--requests", "2", "--scenario", "short_chat",
            "--prompt-tokens", "6000", "--range-ratio", "0", "--out", str(tmp_path), "--name", "bad", "--no-progress"]
    assert sweep.main(argv) == 0
    (level,) = json.loads((tmp_path / "bad" / "summary.json").read_text())["levels"]
    assert level["num_requests"] == 2 and level["num_errors"] == 2
    assert all(reason.startswith("HTTP 400") for reason in level["errors"])
    failures = (tmp_path / "bad" / "level_001" / "locust_failures.csv").read_text()
    assert "HTTP 400" in failures


def test_rewrite_scenario_reports_speculative_acceptance(tmp_path):
    """The rewrite workload against a speculating server: acceptance from the server's counters,
    and a time per output token below the chunk gaps' (chunks carry several tokens)."""
    log = tmp_path / "server.log"
    with ServerProcess(MODEL, "--dtype float32 --speculative ngram", log_path=log, startup_timeout_s=120) as s:
        argv = ["--host", s.url, "--levels", "1", "--duration", "3", "--requests", "2", "--scenario", "rewrite",
                "--api", "completions", "--output-tokens", "48", "--ignore-eos", "--out", str(tmp_path), "--name", "rw",
                "--no-progress"]
        assert sweep.main(argv) == 0
    (level,) = json.loads((tmp_path / "rw" / "summary.json").read_text())["levels"]
    assert level["num_errors"] == 0 and level["mean_output_tokens"] == 48
    assert 0 < level["server_spec_acceptance"] <= 1
    assert level["tpot_ms_p50"] < level["itl_ms_p50"]
