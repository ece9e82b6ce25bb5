"""/v1/completions end to end: shapes, streaming, n, multiple prompts, stop, logprobs, echo
scoring, usage against /tokenize, and greedy text that does not depend on the batch."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest_plugins = ["tests.api_fixtures"]  # shares one session server across test_api_* modules
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, assert_idle  # noqa: E402

GREEDY = {"temperature": 0, "ignore_eos": True}


def complete(server, **body) -> dict:
    with server.client() as client:
        response = client.post("/v1/completions", json={"model": TINY_MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(server, **body) -> list[dict]:
    with server.client() as client:
        with client.stream("POST", "/v1/completions", json={"model": TINY_MODEL, "stream": True, **body}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames)
    return [json.loads(f[len("data: "):]) for f in frames[:-1]]


def token_count(server, text: str) -> int:
    with server.client() as client:
        return client.post("/tokenize", json={"model": TINY_MODEL, "prompt": text}).json()["count"]


def test_completion_shape_and_usage_agree_with_tokenize(tiny_server):
    prompt = "The capital of France is"
    out = complete(tiny_server, prompt=prompt, max_tokens=5, **GREEDY)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["model"] == TINY_MODEL and isinstance(out["created"], int)
    [choice] = out["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert out["usage"] == {"prompt_tokens": token_count(tiny_server, prompt), "completion_tokens": 5,
                            "total_tokens": token_count(tiny_server, prompt) + 5}


def test_max_tokens_defaults_to_16(tiny_server):
    assert complete(tiny_server, prompt="Hello", **GREEDY)["usage"]["completion_tokens"] == 16


def test_stream_matches_non_stream_and_reports_usage(tiny_server):
    body = dict(prompt="Once upon a time", max_tokens=12, **GREEDY)
    full = complete(tiny_server, **body)
    chunks = stream_chunks(tiny_server, **body, stream_options={"include_usage": True})
    *token_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert len({c["id"] for c in chunks}) == 1


def test_n_and_multiple_prompts_index_choices_prompt_major(tiny_server):
    prompts = ["One two three", "Red green blue"]
    out = complete(tiny_server, prompt=prompts, n=2, max_tokens=4, **GREEDY)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    alone = [complete(tiny_server, prompt=p, max_tokens=4, **GREEDY)["choices"][0]["text"] for p in prompts]
    assert [c["text"] for c in out["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    prompt_tokens = sum(token_count(tiny_server, p) for p in prompts)
    assert out["usage"]["prompt_tokens"] == prompt_tokens and out["usage"]["completion_tokens"] == 16


def test_sampled_n_with_seed_is_reproducible_and_streams_every_index(tiny_server):
    body = dict(prompt="Seeded", n=3, max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    first, second = complete(tiny_server, **body), complete(tiny_server, **body)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    chunks = stream_chunks(tiny_server, **body, stream_options={"include_usage": True})
    texts = {i: "" for i in range(3)}
    for chunk in chunks[:-1]:
        texts[chunk["choices"][0]["index"]] += chunk["choices"][0]["text"]
    assert [texts[i] for i in range(3)] == [c["text"] for c in first["choices"]]
    assert chunks[-1]["usage"]["completion_tokens"] == 18


def test_token_id_prompts_match_text_prompts(tiny_server):
    with tiny_server.client() as client:
        ids = client.post("/tokenize", json={"prompt": "Token ids work too"}).json()["tokens"]
    by_text = complete(tiny_server, prompt="Token ids work too", max_tokens=5, **GREEDY)
    by_ids = complete(tiny_server, prompt=ids, max_tokens=5, **GREEDY)
    by_id_lists = complete(tiny_server, prompt=[ids, ids], max_tokens=5, **GREEDY)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert [c["text"] for c in by_id_lists["choices"]] == [by_text["choices"][0]["text"]] * 2


def test_stop_string_cuts_the_text(tiny_server):
    text = complete(tiny_server, prompt="Stop here", max_tokens=24, **GREEDY)["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    out = complete(tiny_server, prompt="Stop here", max_tokens=24, stop=[stop], **GREEDY)
    assert out["choices"][0]["text"] == text[: text.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_logprobs_shape(tiny_server):
    out = complete(tiny_server, prompt="Logprobs", max_tokens=4, logprobs=3, **GREEDY)
    logprobs = out["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 4
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely


def test_echo_scoring_returns_prompt_logprobs_first_null(tiny_server):
    prompt = "The quick brown fox jumps over the lazy dog"
    out = complete(tiny_server, prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    count = token_count(tiny_server, prompt)
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == count and "".join(logprobs["tokens"]) == prompt
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs["token_logprobs"][1:])
    assert out["usage"] == {"prompt_tokens": count, "completion_tokens": 0, "total_tokens": count}


def test_echo_scores_agree_with_generation_logprobs(tiny_server):
    with tiny_server.client() as client:
        prompt_ids = client.post("/tokenize", json={"prompt": "Scoring is consistent"}).json()["tokens"]
    generated = complete(tiny_server, prompt=prompt_ids, max_tokens=5, logprobs=0, **GREEDY)
    gen_lp = generated["choices"][0]["logprobs"]
    text = "Scoring is consistent" + generated["choices"][0]["text"]
    with tiny_server.client() as client:
        full_ids = client.post("/tokenize", json={"prompt": text}).json()["tokens"]
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) != len(prompt_ids) + 5:
        pytest.skip("generated tokens do not re-tokenize to themselves")
    scored = complete(tiny_server, prompt=full_ids, echo=True, max_tokens=0, logprobs=0)
    tail = scored["choices"][0]["logprobs"]["token_logprobs"][-5:]
    assert tail == pytest.approx(gen_lp["token_logprobs"], abs=1e-3)


def test_echo_while_generating_prefixes_prompt(tiny_server):
    plain = complete(tiny_server, prompt="Echo me", max_tokens=3, **GREEDY)["choices"][0]["text"]
    echoed = complete(tiny_server, prompt="Echo me", max_tokens=3, echo=True, logprobs=1, **GREEDY)["choices"][0]
    assert echoed["text"] == "Echo me" + plain
    assert echoed["logprobs"]["token_logprobs"][0] is None
    streamed = stream_chunks(tiny_server, prompt="Echo me", max_tokens=3, echo=True, **GREEDY)
    assert "".join(c["choices"][0]["text"] for c in streamed) == "Echo me" + plain


def test_concurrent_greedy_requests_match_running_alone(tiny_server):
    prompts = [f"Request number {i} says" for i in range(8)]
    body = dict(max_tokens=24, **GREEDY)
    alone = [complete(tiny_server, prompt=p, **body)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: complete(tiny_server, prompt=p, **body)["choices"][0]["text"], prompts))
    assert together == alone
    assert_idle(tiny_server)


def test_openai_client_completions_with_extras(tiny_server):
    client = tiny_server.openai()
    out = client.completions.create(model=TINY_MODEL, prompt="Hello from the client", max_tokens=6,
                                    temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5,
                                    frequency_penalty=0.5, user="tester",
                                    extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                                                "ignore_eos": True, "min_tokens": 2})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
    stream = client.completions.create(model=TINY_MODEL, prompt="Hi", max_tokens=5, stream=True,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert "".join(chunk.choices[0].text for chunk in stream) == \
        complete(tiny_server, prompt="Hi", max_tokens=5, **GREEDY)["choices"][0]["text"]


def test_max_tokens_zero_returns_at_once_even_for_one_token_prompts(tiny_server):
    out = complete(tiny_server, prompt="hi", max_tokens=0)
    assert out["choices"][0]["text"] == "" and out["usage"]["completion_tokens"] == 0
    echoed = complete(tiny_server, prompt="hi", max_tokens=0, echo=True, logprobs=0)["choices"][0]
    assert echoed["text"] == "hi" and echoed["logprobs"]["token_logprobs"] == [None]
