"""/metrics: valid Prometheus text with every series DESIGN.md names, and counters that move by
exactly the size of the requests served."""
from __future__ import annotations

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, assert_idle  # noqa: E402

SERIES = [
    "nanoserve_num_requests_running", "nanoserve_num_requests_waiting", "nanoserve_kv_cache_usage_perc",
    "nanoserve_num_preemptions_total", "nanoserve_prompt_tokens_total", "nanoserve_generation_tokens_total",
    "nanoserve_prefix_cache_queries_total", "nanoserve_prefix_cache_hits_total",
    "nanoserve_time_to_first_token_seconds_count", "nanoserve_inter_token_latency_seconds_count",
    "nanoserve_e2e_request_latency_seconds_count", "nanoserve_request_queue_time_seconds_count",
    "nanoserve_request_prompt_tokens_count", "nanoserve_request_generation_tokens_count",
    "nanoserve_batch_size_count", "nanoserve_iteration_tokens_count", "nanoserve_build_info",
    "nanoserve_spec_decode_num_drafts_total", "nanoserve_spec_decode_num_draft_tokens_total",
    "nanoserve_spec_decode_num_accepted_tokens_total",
]


def value(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def moved(before: dict, after: dict, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_every_series_is_there_with_model_name(tiny_server):
    with tiny_server.client() as client:
        text = client.get("/metrics").text
    names = {key[0] for key in tiny_server.metrics()}
    assert set(SERIES) <= names, set(SERIES) - names
    assert f'nanoserve_num_requests_running{{model_name="{TINY_MODEL}"}}' in text
    for reason in ("stop", "length", "abort"):
        assert ("nanoserve_request_success_total", (("finished_reason", reason),)) in tiny_server.metrics()


def test_counters_move_by_exactly_the_request_size(tiny_server):
    assert_idle(tiny_server)
    prompt = "Count these prompt tokens exactly"
    with tiny_server.client() as client:
        num_prompt = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
        before = tiny_server.metrics()
        body = {"model": TINY_MODEL, "prompt": prompt, "max_tokens": 7, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).status_code == 200
        after = tiny_server.metrics()
    assert moved(before, after, "nanoserve_prompt_tokens_total") == num_prompt
    assert moved(before, after, "nanoserve_generation_tokens_total") == 7
    assert moved(before, after, "nanoserve_time_to_first_token_seconds_count") == 1
    assert moved(before, after, "nanoserve_inter_token_latency_seconds_count") == 6
    assert moved(before, after, "nanoserve_e2e_request_latency_seconds_count") == 1
    assert moved(before, after, "nanoserve_request_success_total", finished_reason="length") == 1
    assert moved(before, after, "nanoserve_request_prompt_tokens_sum") == num_prompt
    assert moved(before, after, "nanoserve_request_generation_tokens_sum") == 7
    assert moved(before, after, "nanoserve_prefix_cache_queries_total") >= num_prompt - 16


def test_n_streaming_and_echo_scoring_are_counted(tiny_server):
    assert_idle(tiny_server)
    prompt = "Three choices share one prompt"
    with tiny_server.client() as client:
        num_prompt = client.post("/tokenize", json={"prompt": prompt}).json()["count"]
        before = tiny_server.metrics()
        body = {"model": TINY_MODEL, "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "n": 3, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.read().decode().rstrip().endswith("[DONE]")
        mid = tiny_server.metrics()
        score = {"model": TINY_MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
        assert client.post("/v1/completions", json=score).status_code == 200
        after = tiny_server.metrics()
    assert moved(before, mid, "nanoserve_generation_tokens_total") == 15
    assert moved(before, mid, "nanoserve_prompt_tokens_total") == num_prompt  # once per request
    assert moved(before, mid, "nanoserve_time_to_first_token_seconds_count") == 1
    assert moved(mid, after, "nanoserve_prompt_tokens_total") == num_prompt
    assert moved(mid, after, "nanoserve_generation_tokens_total") == 0
    assert moved(mid, after, "nanoserve_request_success_total", finished_reason="length") == 1


def test_gauges_are_current_when_idle(tiny_server):
    assert_idle(tiny_server)
    m = tiny_server.metrics()
    assert value(m, "nanoserve_num_requests_running") == 0 and value(m, "nanoserve_kv_cache_usage_perc") == 0
    info = [k for k in m if k[0] == "nanoserve_build_info"]
    assert info and dict(info[0][1])["dtype"] == "float32"
