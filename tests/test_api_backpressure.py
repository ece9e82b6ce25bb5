"""Beyond --max-queue waiting requests the server answers 429 with Retry-After, before any
stream starts; it never answers 5xx, and every request it accepted completes."""
from __future__ import annotations

import asyncio

import httpx
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, assert_idle, run_server  # noqa: E402

MAX_TOKENS = 24


async def one_request(client: httpx.AsyncClient, i: int) -> tuple[int, dict, str]:
    body = {"model": TINY_MODEL, "prompt": f"flood {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if i % 2 == 0:
        response = await client.post("/v1/completions", json=body)
        return response.status_code, dict(response.headers), response.text
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        text = (await response.aread()).decode()
        return response.status_code, dict(response.headers), text


async def flood(url: str, num_requests: int) -> list[tuple[int, dict, str]]:
    limits = httpx.Limits(max_connections=num_requests, max_keepalive_connections=num_requests)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one_request(client, i) for i in range(num_requests)))


def test_flood_beyond_max_queue():
    with run_server("--max-queue", "4", "--max-num-seqs", "2") as server:
        results = asyncio.run(flood(server.url, 48))
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 10 and statuses.count(200) >= 4, statuses  # at least --max-queue
        for i, (status, headers, text) in enumerate(results):
            if status == 429:
                assert int(headers["retry-after"]) >= 1
                assert '"rate_limit_error"' in text and not text.startswith("data:")
            elif i % 2 == 0:
                assert '"finish_reason":"length"' in text and f'"completion_tokens":{MAX_TOKENS}' in text
            else:
                assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in text
        assert_idle(server)
        m = server.metrics()
        assert m[("nanoserve_request_success_total", (("finished_reason", "length"),))] == statuses.count(200)


def test_a_huge_prompt_does_not_stall_the_event_loop():
    """Tokenizing runs in a worker thread: while a 40 MB prompt is being encoded (seconds), the
    server keeps answering; on the event loop it would answer nothing until the encode ends.
    Nothing after it holds the GIL for long either: the ~20M ids become a list in slices, and
    the engine refuses the length before it scans the ids."""
    import json
    import random
    import string
    import threading
    import time

    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(1000)]
    prompt = " ".join(rng.choice(words) for _ in range(6_000_000))  # ~40 MB, ~3M tokens
    with run_server("--max-request-bytes", str(64 << 20)) as server:
        done = threading.Event()

        body = json.dumps({"model": TINY_MODEL, "prompt": prompt, "max_tokens": 1}).encode()  # not while timing

        def post_huge() -> None:
            with server.client(timeout=300) as client:
                response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400  # far beyond the context, once counted
            done.set()

        thread = threading.Thread(target=post_huge)
        thread.start()
        latencies = []  # /health round trips that started and ended while the huge request ran
        with server.client(timeout=60) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get("/health").status_code == 200
                if not done.is_set():
                    latencies.append(time.monotonic() - start)
                time.sleep(0.05)
        thread.join(300)
        assert max(latencies) < 1.0, latencies  # on the event loop: one of them waits ~3 s
        assert len(latencies) >= 5, latencies
