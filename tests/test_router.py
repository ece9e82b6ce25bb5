"""Replicas behind a real cache-aware router: sglang-router (its Rust binary, from PyPI) on
loopback in front of two real nanoserve replicas. Requests spread across both; cache-aware
routing keeps each prefix on the replica that cached it (more prefix-cache hits than round
robin on the same workload); a replica killed mid-load is routed around."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from loadtest.launcher import wait_healthy  # noqa: E402
from tests.api_fixtures import TINY_MODEL, RunningServer, free_port, run_server  # noqa: E402

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@contextmanager
def replicas(count: int = 2) -> Iterator[list[RunningServer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(run_server("--dtype", "float32")) for _ in range(count)]


@contextmanager
def router(workers: list[RunningServer], policy: str, *extra: str) -> Iterator[str]:
    """`python -m sglang_router.launch_router` in front of the workers; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
               "--worker-urls", *[w.url for w in workers], "--policy", policy,
               "--prometheus-port", str(free_port()), "--log-level", "warn", *extra]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, 60, proc, path="/v1/models")  # 200 once the workers are registered
        except (RuntimeError, TimeoutError):
            log.seek(0)
            raise AssertionError(log.read().decode(errors="replace")[-3000:]) from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def complete(url: str, prompt: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60,
                      json={"model": TINY_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def counter(server: RunningServer, name: str) -> float:
    return sum(v for (sample, _), v in server.metrics().items() if sample == name)


def shared_prefix_workload(tag: str, num_prefixes: int = 3, per_prefix: int = 6) -> list[str]:
    """num_prefixes long prefixes (~100 tokens) with short suffixes, interleaved, so that round
    robin over two replicas sends every prefix to both."""
    prefixes = [" ".join(f"{tag}{p}{w}" for w in WORDS * 3) for p in range(num_prefixes)]
    return [f"{prefixes[p]} question {i}?" for i in range(per_prefix) for p in range(num_prefixes)]


@pytest.fixture(scope="module")
def pair() -> Iterator[list[RunningServer]]:
    with replicas() as servers:
        yield servers


def test_round_robin_spreads_requests_over_both_replicas(pair):
    before = [counter(s, "nanoserve_request_success_total") for s in pair]
    with router(pair, "round_robin") as url:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [TINY_MODEL]  # from /server_info
        for i in range(8):
            response = complete(url, f"Request number {i} says hello")
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"]
    served = [counter(s, "nanoserve_request_success_total") - b for s, b in zip(pair, before)]
    assert served == [4, 4]


def test_cache_aware_routing_beats_round_robin_on_prefix_hits(pair):
    hits = {}
    for policy in ("round_robin", "cache_aware"):
        before = sum(counter(s, "nanoserve_prefix_cache_hits_total") for s in pair)
        with router(pair, policy) as url:
            for prompt in shared_prefix_workload(tag=policy[:2]):
                assert complete(url, prompt).status_code == 200
        hits[policy] = sum(counter(s, "nanoserve_prefix_cache_hits_total") for s in pair) - before
    print(f"prefix-cache hit tokens over 18 requests: {hits}")
    assert hits["cache_aware"] > hits["round_robin"] > 0


def test_router_routes_around_a_killed_replica():
    with replicas() as (alive, doomed), router([alive, doomed], "round_robin", "--health-check-interval-secs", "1",
                                               "--health-failure-threshold", "1") as url:
        prompts = [f"Load request {i}: tell me a story about {WORDS[i % len(WORDS)]}" for i in range(24)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, url, p, 48) for p in prompts]
            time.sleep(1.0)
            doomed.proc.kill()  # mid-load: some of its requests are in flight
            results = []
            for future in futures:
                try:
                    results.append(future.result().status_code)
                except httpx.HTTPError:
                    results.append(None)
        failed = sum(code != 200 for code in results)
        print(f"{failed} of {len(results)} requests failed when one replica was killed mid-load")
        assert failed <= 4  # at most the requests in flight on the dead replica (4 client threads)
        time.sleep(2)  # the router's health check marks it down
        after = [complete(url, f"After the kill {i}").status_code for i in range(6)]
        assert after == [200] * 6
        assert alive.proc.poll() is None and doomed.proc.poll() is not None
