"""Speculative decoding over HTTP: same greedy text as without it, several tokens per streamed
chunk, a per-request opt-out, acceptance counters in /metrics, nothing held after a disconnect."""
from __future__ import annotations

import httpx
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import assert_idle, run_server  # noqa: E402

PROMPT = [5, 6, 7, 8] * 8  # the tiny random model settles into a loop the n-gram lookup finds


@pytest.fixture(scope="module")
def spec_server():
    with run_server("--dtype", "float32", "--speculative", "ngram", "--num-speculative-tokens", "4") as server:
        yield server


def accepted(server) -> float:
    return server.metrics()[("nanoserve_spec_decode_num_accepted_tokens_total", ())]


def test_same_text_with_and_without_speculation(spec_server):
    client = spec_server.openai()
    before = accepted(spec_server)
    common = dict(model="random:tiny-qwen2", prompt=PROMPT, max_tokens=48, temperature=0)
    spec = client.completions.create(**common, extra_body={"ignore_eos": True})
    after_spec = accepted(spec_server)
    plain = client.completions.create(**common, extra_body={"ignore_eos": True, "speculative": False})
    assert spec.choices[0].text == plain.choices[0].text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens == 48
    assert after_spec > before, "the speculative request accepted drafts"
    assert accepted(spec_server) == after_spec, "the opted-out request verified nothing"
    assert "speculative decoding: n-gram prompt lookup" in spec_server.log_tail(200_000)


def test_stream_carries_several_tokens_per_chunk(spec_server):
    client = spec_server.openai()
    stream = client.completions.create(model="random:tiny-qwen2", prompt=PROMPT, max_tokens=48, temperature=0,
                                       stream=True, logprobs=1, extra_body={"ignore_eos": True})
    chunks = [chunk for chunk in stream if chunk.choices and chunk.choices[0].logprobs]
    tokens_per_chunk = [len(chunk.choices[0].logprobs.tokens) for chunk in chunks]
    assert sum(tokens_per_chunk) == 48 and max(tokens_per_chunk) > 1


def test_bad_opt_out_value_is_a_400(spec_server):
    with spec_server.client() as client:
        response = client.post("/v1/completions", json={"prompt": "hi", "speculative": "sometimes"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "speculative"


def test_disconnect_mid_speculation_frees_everything(spec_server):
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=spec_server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i > 10:
                    break
    assert_idle(spec_server)
