"""Client disconnects abort their requests: 16 streaming clients that leave after a few chunks,
and a non-streaming client that times out, leave nothing running and no KV block held."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, assert_idle, gauge, wait_for  # noqa: E402

LONG = {"model": TINY_MODEL, "max_tokens": 3000, "ignore_eos": True, "temperature": 0.7}


def aborted(server) -> float:
    return server.metrics()[("nanoserve_request_success_total", (("finished_reason", "abort"),))]


def read_a_few_chunks_then_leave(server, i: int) -> int:
    path = "/v1/chat/completions" if i % 2 else "/v1/completions"
    body = {**LONG, "stream": True}
    body.update({"messages": [{"role": "user", "content": f"story {i}"}]} if i % 2 else {"prompt": f"story {i}"})
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            frames = 0
            for line in response.iter_lines():
                frames += bool(line)
                if frames == 3:
                    break
    return frames


def test_sixteen_streaming_clients_disconnect(tiny_server):
    assert_idle(tiny_server)
    before = aborted(tiny_server)
    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda i: read_a_few_chunks_then_leave(tiny_server, i), range(16))) == [3] * 16
    assert_idle(tiny_server, timeout_s=5)
    assert aborted(tiny_server) == before + 16
    with tiny_server.client() as client:  # the engine thread keeps serving
        out = client.post("/v1/completions", json={"model": TINY_MODEL, "prompt": "still there?", "max_tokens": 3})
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_timeout_aborts(tiny_server):
    assert_idle(tiny_server)
    before = aborted(tiny_server)
    with httpx.Client(base_url=tiny_server.url, timeout=1.0) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json={**LONG, "prompt": "never read"})
    assert wait_for(lambda: aborted(tiny_server) == before + 1, timeout_s=5)
    assert_idle(tiny_server, timeout_s=5)
    assert gauge(tiny_server, "nanoserve_kv_cache_usage_perc") == 0
