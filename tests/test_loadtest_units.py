"""Load harness pieces without a server: seeded lengths, request bodies, the SSE reader's verdicts,
level statistics, the plots, wandb staying unimported, and the locustfile loading under Locust."""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

from loadtest import report, sweep
from loadtest.client import RequestFailed, RequestRecord, build_body, read_sse
from loadtest.scenarios import SCENARIOS, LengthDist, RequestSpec, build_scenario, draw_request

if importlib.util.find_spec("locust") is None:  # looked up, not imported: importing locust
    pytest.skip("locust is not installed", allow_module_level=True)  # gevent-patches this whole process
pytest.importorskip("matplotlib")
REPO = Path(__file__).resolve().parents[1]


def test_lengths_are_seeded_and_inside_their_range():
    dist = LengthDist(100, 0.25)
    draws = [dist.sample(random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    many = [dist.sample(random.Random(i)) for i in range(500)]
    assert min(many) >= 75 and max(many) <= 125 and len(set(many)) > 20
    assert {LengthDist(32, 0.0).sample(random.Random(i)) for i in range(20)} == {32}


def test_same_seed_same_requests_and_shared_prefix_is_shared():
    scenario = build_scenario("shared_prefix", 4096)
    a = [draw_request(scenario, random.Random(3), seed=1) for _ in range(2)]
    b = [draw_request(scenario, random.Random(3), seed=1) for _ in range(2)]
    assert a == b
    other = draw_request(scenario, random.Random(4), seed=1)
    assert other.system == a[0].system and other.prompt != a[0].prompt


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_fits_the_context(name):
    scenario = build_scenario(name, 1024)
    rng = random.Random(0)
    for _ in range(50):
        spec = draw_request(scenario, rng, seed=0)
        prompt_tokens = len(spec.prompt.split()) + len((spec.system or "").split())
        assert prompt_tokens + spec.max_tokens <= 1024 - 32
    if name == "long_prompt":
        assert scenario.prompt.mean > 0.7 * 1024


def test_unknown_scenario_is_rejected():
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenario("nope", 1024)


def test_bodies_for_chat_and_completions():
    spec = RequestSpec("shared_prefix", "SYS", "hello there", 16)
    chat = build_body(spec, "chat", "m", stream=True, ignore_eos=True, temperature=0.0, seed=None)
    assert chat["messages"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "hello there"}]
    assert chat["stream_options"] == {"include_usage": True} and chat["ignore_eos"] is True
    completion = build_body(spec, "completions", "m", stream=False, ignore_eos=False, temperature=0.7, seed=5)
    assert completion["prompt"].startswith("SYS") and "stream_options" not in completion
    assert "ignore_eos" not in completion and completion["seed"] == 5


def _sse(*chunks: dict | str) -> list[str]:
    lines = []
    for c in chunks:
        lines += [f"data: {c if isinstance(c, str) else json.dumps(c)}", ""]
    return lines


def _delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


def test_sse_timing_and_usage():
    ticks = iter([1.25, 1.5, 2.0])
    record = RequestRecord("s", "/v1/chat/completions", True, 0.0)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    read_sse(_sse(role, _delta("a"), _delta("b"), _delta("c"), USAGE, "[DONE]"), record, t_send=1.0, clock=lambda: next(ticks))
    assert record.ttft == 0.25 and record.itl == [0.25, 0.5]
    assert (record.prompt_tokens, record.output_tokens) == (7, 3)


@pytest.mark.parametrize("chunks, reason", [
    ((_delta("a"), USAGE), "without \\[DONE\\]"),
    ((_delta("a"), "[DONE]"), "no usage chunk"),
    (("{not json",), "malformed SSE data"),
    (({"error": {"message": "engine died"}},), "error in stream: engine died"),
    ((USAGE, "[DONE]", _delta("late")), "data after \\[DONE\\]"),
])
def test_sse_failures_say_why(chunks, reason):
    with pytest.raises(RequestFailed, match=reason):
        read_sse(_sse(*chunks), RequestRecord("s", "/v1/completions", True, 0.0), t_send=0.0)


def _records(n: int, start: float = 100.0) -> list[RequestRecord]:
    out = [RequestRecord("short_chat", "/v1/chat/completions", True, start + i, e2e=1.0, ttft=0.1 * (i + 1),
                         itl=[0.02, 0.04], prompt_tokens=10, output_tokens=20) for i in range(n)]
    out.append(RequestRecord("short_chat", "/v1/chat/completions", True, start, e2e=0.5, error="HTTP 429: queue full"))
    return out


def test_level_summary_rates_and_percentiles():
    s = report.summarize_level(2, _records(4), server_tokens=80.0)
    assert s.duration_s == 4.0 and s.num_requests == 5 and s.num_errors == 1
    assert s.output_tokens == 80 and s.output_tokens_per_s == 20.0 and s.requests_per_s == 1.0
    assert s.server_output_tokens_per_s == 20.0
    assert s.ttft_ms_p50 == pytest.approx(250.0) and s.itl_ms_p99 == pytest.approx(40.0, rel=0.01)
    assert s.errors == {"HTTP 429: queue full": 1}


def test_summary_and_plots_are_written(tmp_path):
    levels = [report.summarize_level(u, _records(3)) for u in (1, 2, 4)]
    report.write_summary(tmp_path, {"scenario": "short_chat"}, levels)
    paths = report.write_plots(tmp_path, levels, {1: [0.1, 0.2], 2: [0.3], 4: []}, "test")
    assert json.loads((tmp_path / "summary.json").read_text())["levels"][2]["users"] == 4
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_wandb_logs_each_level_only_when_asked(tmp_path, monkeypatch):
    calls: list = []

    class FakeRun:
        def log(self, data, step=None):
            calls.append((step, data))

        def finish(self):
            calls.append("finish")

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    levels = [report.summarize_level(u, _records(2)) for u in (1, 2)]
    args = argparse.Namespace(wandb_project="p")
    sweep.log_to_wandb(args, {}, levels, [tmp_path / "throughput.png"])
    assert [c[0] for c in calls[:2]] == [0, 1] and calls[0][1]["output_tokens_per_s"] == levels[0].output_tokens_per_s
    assert calls[2][1] == {"throughput": ("image", str(tmp_path / "throughput.png"))} and calls[-1] == "finish"


def test_sweep_module_does_not_import_wandb():
    code = "import loadtest.sweep, loadtest.report, sys; assert 'wandb' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_locustfile_loads_with_its_users_and_tagged_tasks():
    out = subprocess.run([sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--list"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "ChatUser" in out.stdout and "CompletionUser" in out.stdout


def test_nanoserve_loadtest_subcommand_takes_the_sweep_flags(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["loadtest", "--help"])
    assert exit_info.value.code == 0
    assert "--levels" in capsys.readouterr().out


@pytest.mark.parametrize("status, body", [
    (501, b'{"error":{"code":501,"message":"This server does not support metrics endpoint. Start it with `--metrics`"}}'),
    (200, b'{"error": "not prometheus text"}'),
    (200, b""),
    (200, b"# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.\n"
          b"# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total 2176\n"),
])
def test_a_peer_without_nanoserve_metrics_reports_no_counters(status, body, capsys):
    """llama-server without --metrics answers /metrics with a JSON error, and with it its own
    counters: the sweep goes on without server counters (a warning says why) instead of dying in
    the Prometheus parser or reporting a server rate of zero."""
    import http.server
    import threading

    class Peer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    peer = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Peer)
    threading.Thread(target=peer.serve_forever, daemon=True).start()
    try:
        assert sweep.read_counters(f"http://127.0.0.1:{peer.server_address[1]}") is None
        assert "warning: " in capsys.readouterr().err
    finally:
        peer.shutdown()
        peer.server_close()
