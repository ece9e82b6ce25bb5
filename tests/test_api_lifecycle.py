"""Server lifecycle: /health 503 while loading then 200, SIGTERM drains in-flight requests and
exits 0, a dying engine loop fails open requests loudly and turns /health to 503, the CLI
lists every flag, a model that cannot load exits 1; /version and /v1/models shapes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import ROOT, TINY_MODEL, RunningServer, free_port, run_server, wait_for  # noqa: E402


def test_version_and_models(tiny_server):
    with tiny_server.client() as client:
        assert isinstance(client.get("/version").json()["version"], str)
        models = client.get("/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == TINY_MODEL and card["object"] == "model" and card["max_model_len"] == 4096


def test_health_is_503_while_loading_then_200():
    server = RunningServer(["--model", TINY_MODEL])
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.append(httpx.get(server.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        assert 503 in seen and seen[-1] == 200, seen
    finally:
        assert server.stop() == 0


def _stream_lines(server, body: dict, lines: list[str], started: threading.Event) -> None:
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
    except httpx.HTTPError as error:
        lines.append(f"error: {error!r}")
    started.set()


def test_sigterm_finishes_in_flight_requests_and_exits_0():
    with run_server() as server:
        body = {"model": TINY_MODEL, "prompt": "drain me", "max_tokens": 200, "ignore_eos": True, "stream": True}
        lines, started = [], threading.Event()
        reader = threading.Thread(target=_stream_lines, args=(server, body, lines, started))
        reader.start()
        assert started.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log_tail()
        reader.join(10)
        assert lines[-1] == "data: [DONE]", lines[-3:]
        last = json.loads([line for line in lines if line.startswith("data: {")][-1][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health", timeout=2)


def test_sigterm_aborts_what_outlives_the_shutdown_timeout():
    with run_server("--shutdown-timeout", "1") as server:
        body = {"model": TINY_MODEL, "prompt": "too long", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        lines, started = [], threading.Event()
        reader = threading.Thread(target=_stream_lines, args=(server, body, lines, started))
        reader.start()
        assert started.wait(30)
        begin = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log_tail()
        assert time.monotonic() - begin < 15
        reader.join(10)
        assert "engine stopped" in server.log_tail()


def test_unloadable_model_exits_1():
    command = [sys.executable, "-m", "server", "--model", "/no/such/model", "--port", str(free_port())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]


def test_serve_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60).stdout
    for flag in ["--model", "--host", "--port", "--served-model-name", "--dtype", "--device", "--max-model-len",
                 "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--kv-cache-memory",
                 "--num-kv-blocks", "--enable-prefix-caching", "--no-enable-prefix-caching", "--max-queue",
                 "--api-key", "--log-level", "--max-request-bytes", "--shutdown-timeout", "--tensor-parallel-size",
                 "--quantization"]:
        assert flag in out, flag


@pytest.fixture
def broken_engine_server():
    """build_app with an injected engine whose step() fails after a few calls, on uvicorn in a thread."""
    from models.loader import load_model
    from server.api.app import build_app
    from server.api.server_config import ServerConfig
    from server.config import EngineConfig
    from server.engine.engine import Engine

    engine = Engine(load_model(TINY_MODEL), EngineConfig(num_kv_blocks=256))
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 20:
            raise RuntimeError("simulated GPU fault")
        return real_step()

    engine.step = failing_step
    port = free_port()
    app = build_app(ServerConfig(model=TINY_MODEL, port=port), engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: _status(url + "/health") == 200, timeout_s=30)
    yield url
    server.should_exit = True
    thread.join(30)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_dying_engine_loop_fails_requests_loudly(broken_engine_server, stream):
    url = broken_engine_server
    body = {"model": TINY_MODEL, "prompt": "doomed", "max_tokens": 100, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=30) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                frames = [line for line in response.iter_lines() if line]
            assert '"error"' in frames[-2] and "simulated GPU fault" in frames[-2] and frames[-1] == "data: [DONE]"
        else:  # the engine dies while the request waits for its whole answer: 503, not 500
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 503, response.text
            assert "simulated GPU fault" in response.json()["error"]["message"]
        assert _status(url + "/health") == 503
        after = client.post("/v1/completions", json=body)
        assert after.status_code == 503 and "engine" in after.json()["error"]["message"]


def test_the_server_loads_and_steps_on_one_thread(tiny_server):
    """The model loads on the thread that runs the engine loop (server/engine/engine_thread.py)."""
    with tiny_server.client() as client:
        response = client.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "hi", "max_tokens": 4})
    assert response.status_code == 200
    assert "runs on another thread than the one that built the engine" not in tiny_server.log_tail(10**6)
