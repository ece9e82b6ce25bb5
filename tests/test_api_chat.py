"""/v1/chat/completions end to end: shapes, role-first streaming, include_usage with n > 1,
logprobs in the chat shape, text parts, usage against /tokenize, and the real default model."""
from __future__ import annotations

import json

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, run_server  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "Another "}, {"type": "text", "text": "one?"}]}]
GREEDY = {"temperature": 0, "ignore_eos": True}


def chat(server, **body) -> dict:
    with server.client() as client:
        response = client.post("/v1/chat/completions", json={"model": TINY_MODEL, "messages": MESSAGES, **body})
    assert response.status_code == 200, response.text
    return response.json()


def chat_chunks(server, **body) -> list[dict]:
    with server.client() as client:
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": TINY_MODEL, "messages": MESSAGES, "stream": True, **body}) as r:
            assert r.status_code == 200
            frames = [line for line in r.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]


def test_chat_shape_and_usage_agree_with_tokenize(tiny_server):
    out = chat(tiny_server, max_tokens=6, **GREEDY)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    with tiny_server.client() as client:
        count = client.post("/tokenize", json={"model": TINY_MODEL, "messages": MESSAGES}).json()["count"]
    assert out["usage"] == {"prompt_tokens": count, "completion_tokens": 6, "total_tokens": count + 6}


def test_max_completion_tokens_wins_over_max_tokens(tiny_server):
    out = chat(tiny_server, max_tokens=9, max_completion_tokens=3, **GREEDY)
    assert out["usage"]["completion_tokens"] == 3


def test_stream_role_first_then_content_then_usage(tiny_server):
    full = chat(tiny_server, max_tokens=8, **GREEDY)
    chunks = chat_chunks(tiny_server, max_tokens=8, stream_options={"include_usage": True}, **GREEDY)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    body, last = chunks[1:-1], chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in body) == full["choices"][0]["message"]["content"]
    assert all("role" not in c["choices"][0]["delta"] for c in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert last["choices"] == [] and last["usage"] == full["usage"]


def test_stream_with_n_sums_usage_over_choices(tiny_server):
    chunks = chat_chunks(tiny_server, n=3, max_tokens=5, seed=1, ignore_eos=True,
                         stream_options={"include_usage": True})
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1, 2]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    assert chunks[-1]["usage"]["completion_tokens"] == 15


def test_non_stream_n_choices(tiny_server):
    out = chat(tiny_server, n=2, max_tokens=4, **GREEDY)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["message"] == out["choices"][1]["message"]  # greedy: identical
    assert out["usage"]["completion_tokens"] == 8


def test_chat_logprobs_shape(tiny_server):
    out = chat(tiny_server, max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy
    streamed = chat_chunks(tiny_server, max_tokens=4, logprobs=True, **GREEDY)
    tokens = [e for c in streamed[1:] for e in (c["choices"][0]["logprobs"] or {"content": []})["content"]]
    assert [e["token"] for e in tokens] == [e["token"] for e in content]


def test_stop_token_ids_end_generation(tiny_server):
    seeded = {"temperature": 1.0, "seed": 5, "ignore_eos": True}  # greedy random weights repeat one token
    out = chat(tiny_server, max_tokens=12, logprobs=True, **seeded)
    tokens = [e["token"] for e in out["choices"][0]["logprobs"]["content"]]
    with tiny_server.client() as client:
        ids = [client.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in tokens]
    position = next((i for i in range(2, 12) if len(ids[i]) == 1 and ids[i] not in ids[:i]), None)
    if position is None:
        pytest.skip("no single-token piece to stop on")
    stopped = chat(tiny_server, max_tokens=12, stop_token_ids=ids[position], **seeded)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == position + 1


def test_openai_client_chat(tiny_server):
    client = tiny_server.openai()
    out = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_completion_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=1,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and len(out.choices[0].logprobs.content) == 5
    stream = client.chat.completions.create(model=TINY_MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content and chunks[-1].usage.completion_tokens == 5


@pytest.mark.slow
def test_default_model_names_paris():
    """The real SmolLM2-135M-Instruct behind the real server, through the OpenAI client."""
    with run_server(model="smollm2-135m-instruct") as server:
        client = server.openai()
        [model] = client.models.list().data
        assert model.id == "smollm2-135m-instruct"
        question = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model=model.id, messages=question, max_tokens=30, temperature=0)
        assert "Paris" in out.choices[0].message.content
        assert out.choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(model=model.id, messages=question, max_tokens=30,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == out.choices[0].message.content
