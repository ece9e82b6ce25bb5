"""Bad input never reaches a 500: a table of bad requests with their 4xx and OpenAI error shape,
a small fuzz over every field, oversized bodies, and the server idle and healthy afterwards."""
from __future__ import annotations

import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import TINY_MODEL, assert_idle  # noqa: E402

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
OK_PROMPT = {"model": TINY_MODEL, "prompt": "hi", "max_tokens": 2}
OK_CHAT = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}


def cmpl(**fields) -> dict:
    return {**OK_PROMPT, **fields}


def chat(**fields) -> dict:
    return {**OK_CHAT, **fields}


# (id, path, body: dict or raw bytes, expected status, text the message must contain)
CASES = [
    ("malformed-json", CMPL, b'{"prompt": "hi",', 400, "JSON"),
    ("non-utf8-body", CMPL, b'{"prompt": "\xff\xfe"}', 400, ""),
    ("json-array-body", CMPL, b"[1, 2]", 400, ""),
    ("empty-body", CMPL, b"", 400, "empty"),
    ("missing-prompt", CMPL, {"model": TINY_MODEL}, 400, "prompt"),
    ("prompt-wrong-type", CMPL, cmpl(prompt=5), 400, "prompt"),
    ("prompt-empty-string", CMPL, cmpl(prompt=""), 400, "empty"),
    ("prompt-empty-list", CMPL, cmpl(prompt=[]), 400, "empty"),
    ("prompt-empty-token-list", CMPL, cmpl(prompt=[[]]), 400, "token"),
    ("token-id-too-big", CMPL, cmpl(prompt=[10**12]), 400, "token id"),
    ("token-id-negative", CMPL, cmpl(prompt=[-1]), 400, "token id"),
    ("max-tokens-string", CMPL, cmpl(max_tokens="abc"), 400, "max_tokens"),
    ("max-tokens-negative", CMPL, cmpl(max_tokens=-1), 400, "max_tokens"),
    ("max-tokens-huge", CMPL, cmpl(max_tokens=10**30), 400, "4096"),
    ("max-tokens-fraction", CMPL, cmpl(max_tokens=1.5), 400, "max_tokens"),
    ("temperature-negative", CMPL, cmpl(temperature=-1), 400, "temperature"),
    ("temperature-too-high", CMPL, cmpl(temperature=2.5), 400, "temperature"),
    ("temperature-string", CMPL, cmpl(temperature="hot"), 400, "temperature"),
    ("temperature-infinite", CMPL, b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    ("temperature-nan", CMPL, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", CMPL, cmpl(top_p=0), 400, "top_p"),
    ("top-p-above-one", CMPL, cmpl(top_p=1.5), 400, "top_p"),
    ("presence-penalty-range", CMPL, cmpl(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-range", CMPL, cmpl(frequency_penalty=-2.5), 400, "frequency_penalty"),
    ("repetition-penalty-zero", CMPL, cmpl(repetition_penalty=0), 400, "repetition_penalty"),
    ("n-zero", CMPL, cmpl(n=0), 400, "n"),
    ("n-huge", CMPL, cmpl(n=10**6), 400, "n"),
    ("logprobs-too-many", CMPL, cmpl(logprobs=21), 400, "logprobs"),
    ("top-k-negative", CMPL, cmpl(top_k=-5), 400, "top_k"),
    ("min-p-range", CMPL, cmpl(min_p=2), 400, "min_p"),
    ("seed-too-big", CMPL, cmpl(seed=2**70), 400, "seed"),
    ("stop-wrong-type", CMPL, cmpl(stop=5), 400, "stop"),
    ("stop-token-id-out-of-vocab", CMPL, cmpl(stop_token_ids=[10**9]), 400, "stop_token_ids"),
    ("min-tokens-over-max", CMPL, cmpl(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("stream-not-bool", CMPL, cmpl(stream="yes please"), 400, "stream"),
    ("stream-options-wrong-type", CMPL, cmpl(stream_options=3), 400, "stream_options"),
    ("unknown-model", CMPL, cmpl(model="gpt-17"), 404, "gpt-17"),
    ("prompt-over-context", CMPL, cmpl(prompt=[1] * 5000, max_tokens=1), 400, "4096"),
    ("prompt-plus-max-tokens-over-context", CMPL, cmpl(prompt=[1] * 100, max_tokens=4000), 400, "4096"),
    ("chat-messages-missing", CHAT, {"model": TINY_MODEL}, 400, "messages"),
    ("chat-messages-empty", CHAT, chat(messages=[]), 400, "messages"),
    ("chat-messages-string", CHAT, chat(messages="hi"), 400, "messages"),
    ("chat-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "role"),
    ("chat-content-int", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "content"),
    ("chat-image-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    ("chat-user-without-content", CHAT, chat(messages=[{"role": "user"}]), 400, "content"),
    ("chat-top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "logprobs"),
    ("chat-top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=25), 400, "top_logprobs"),
    ("chat-max-completion-tokens-zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("chat-unknown-model", CHAT, chat(model="nope"), 404, "nope"),
    ("chat-over-context", CHAT, chat(messages=[{"role": "user", "content": "hi " * 5000}]), 400, "4096"),
    ("lone-surrogate-prompt", CMPL, b'{"prompt": "a\\ud800b", "echo": true}', 400, "surrogate"),
    ("lone-surrogate-stop", CMPL, b'{"prompt": "a", "stop": ["\\udfff"]}', 400, "surrogate"),
    ("lone-surrogate-model", CMPL, b'{"prompt": "a", "model": "\\ud800"}', 400, "surrogate"),
    ("lone-surrogate-chat", CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}', 400, "surrogate"),
    # structured output, tools, and fields nanoserve does not implement
    ("response-format-unknown-type", CHAT, chat(response_format={"type": "xml"}), 400, "response_format"),
    ("response-format-schema-missing", CHAT, chat(response_format={"type": "json_schema"}), 400, "json_schema"),
    ("json-schema-invalid", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}), 400, "response_format.json_schema.schema"),
    ("regex-invalid", CMPL, cmpl(structured_outputs={"regex": "a(b"}), 400, "structured_outputs.regex"),
    ("guided-regex-invalid", CMPL, cmpl(guided_regex="[z-a]"), 400, "guided_regex"),
    ("grammar-undefined-rule", CMPL, cmpl(guided_grammar="start: missing_rule"), 400, "guided_grammar"),
    ("guided-json-invalid", CMPL, cmpl(guided_json={"type": "object", "properties": {"a": {"type": "nope"}}}), 400, "guided_json"),
    ("two-constraints", CMPL, cmpl(guided_regex="a", guided_choice=["a"]), 400, "at most one"),
    ("structured-outputs-empty", CMPL, cmpl(structured_outputs={}), 400, "exactly one"),
    ("guided-choice-empty", CMPL, cmpl(guided_choice=[]), 400, "guided_choice"),
    ("response-format-on-completions", CMPL, cmpl(response_format={"type": "json_object"}), 400, "response_format"),
    ("unknown-field", CMPL, cmpl(some_future_field=1), 400, "some_future_field"),
    ("logit-bias-set", CMPL, cmpl(logit_bias={"5": 10}), 400, "logit_bias"),
    ("best-of", CMPL, cmpl(best_of=3), 400, "best_of"),
    ("suffix", CMPL, cmpl(suffix="the end"), 400, "suffix"),
    ("legacy-functions", CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    ("tool-choice-without-tools", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("tool-choice-unknown-function", CHAT, chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}), 400, "'g'"),
    ("tool-names-duplicate", CHAT, chat(tools=[TOOL, TOOL]), 400, "unique"),
    ("tool-name-invalid", CHAT, chat(tools=[{"type": "function", "function": {"name": "bad name!"}}]), 400, "name"),
    ("tool-parameters-invalid", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}], tool_choice="required"), 400, "tool_choice"),
    ("tool-message-without-id", CHAT, chat(messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]), 400, "tool_call_id"),
    ("tool-call-arguments-not-json", CHAT, chat(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), 400, "arguments"),
    ("tool-calls-on-user", CHAT, chat(messages=[{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]), 400, "tool_calls"),
    ("tokenize-neither", "/tokenize", {"model": TINY_MODEL}, 400, "prompt or messages"),
    ("tokenize-both", "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, ""),
    ("tokenize-unknown-model", "/tokenize", {"model": "nope", "prompt": "a"}, 404, "nope"),
    ("detokenize-negative", "/detokenize", {"tokens": [-5]}, 400, "tokens"),
    ("detokenize-strings", "/detokenize", {"tokens": ["a"]}, 400, "tokens"),
]


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


@pytest.mark.parametrize("name, path, body, status, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(tiny_server, name, path, body, status, needle):
    with tiny_server.client() as client:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=JSON)
        else:
            response = client.post(path, json=body)
    error = assert_openai_error(response, status)
    assert needle.lower() in error["message"].lower(), error


def test_harmless_fields_and_no_op_defaults_are_accepted(tiny_server):
    """Bookkeeping fields and unimplemented fields at their no-op values are ignored (README)."""
    with tiny_server.client() as client:
        for path, body in [(CMPL, cmpl(user="u", logit_bias={}, best_of=1, suffix="", metadata={"a": "b"})),
                           (CHAT, chat(user="u", store=False, service_tier="auto", functions=[], modalities=["text"],
                                       response_format={"type": "text"}, parallel_tool_calls=False))]:
            response = client.post(path, json=body)
            assert response.status_code == 200, (path, response.text)


def test_context_errors_state_the_limit_and_both_lengths(tiny_server):
    with tiny_server.client() as client:
        response = client.post(CMPL, json=cmpl(prompt=[1] * 100, max_tokens=4000))
    message = assert_openai_error(response, 400)["message"]
    assert "4096" in message and "100" in message and "4000" in message


def test_table_is_big_enough_and_server_is_idle_after_it(tiny_server):
    assert len(CASES) >= 25
    assert_idle(tiny_server)


def test_unknown_route_and_wrong_method_are_openai_shaped(tiny_server):
    with tiny_server.client() as client:
        assert_openai_error(client.get("/v1/nothing-here"), 404)
        assert_openai_error(client.get(CMPL), 405)


def test_oversized_body_is_413(tiny_server):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    with tiny_server.client() as client:
        assert_openai_error(client.post(CMPL, content=big, headers=JSON), 413)
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # chunked: no Content-Length
        assert_openai_error(client.post(CMPL, content=chunks, headers=JSON), 413)


def test_form_body_explains_json_is_needed(tiny_server):
    with tiny_server.client() as client:
        response = client.post(CMPL, data={"prompt": "hi"})
    assert "application/json" in assert_openai_error(response, 400)["message"]


WEIRD = [None, -1, 0, 1e308, -1e308, "x", "", [], {}, [[]], True, 2**64, -(2**64), [-1], ["a", 1], {"a": 1}]
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs",
          "echo", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
          "stop_token_ids", "stream_options", "model", "user"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools",
               "tool_choice", "parallel_tool_calls", "structured_outputs", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar"]


def test_fuzzed_fields_never_give_5xx(tiny_server):
    with tiny_server.client() as client:
        for path, fields, base in [(CMPL, FIELDS, OK_PROMPT), (CHAT, CHAT_FIELDS, OK_CHAT)]:
            for field in fields:
                for value in WEIRD:
                    if field == "max_tokens" and value is None:
                        continue  # valid: up to the context, thousands of tokens
                    body = {**base, "max_tokens": 1, field: value}
                    response = client.post(path, json=body)
                    assert response.status_code < 500, (field, value, response.text)
                    if response.status_code != 200:
                        assert_openai_error(response, response.status_code)
    assert_idle(tiny_server)


def test_openapi_documents_error_responses(tiny_server):
    with tiny_server.client() as client:
        spec = client.get("/openapi.json").json()
    for path in (CMPL, CHAT):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorResponse")
    assert "ErrorResponse" in spec["components"]["schemas"]
