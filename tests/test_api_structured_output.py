"""Structured output through the real server and the official openai client: JSON schemas on the
real default model (validated with jsonschema), regex and choice on every sample of n = 4 at
temperature 1, logprobs under a constraint, and free requests unchanged beside constrained ones."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import DEFAULT_MODEL, TINY_MODEL, assert_idle  # noqa: E402

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "person": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": NAME}, "required": ["id", "email"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    "string-array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"]},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"type": "string", "enum": ["S", "M", "L"]}},
              "required": ["color", "size"]},
    "object-array": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"name": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["name", "qty"]}}}, "required": ["items"]},
    "bounded-number": {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50},
                                                        "unit": {"const": "C"}}, "required": ["temperature", "unit"]},
    "optional-field": {"type": "object", "properties": {"title": NAME, "subtitle": NAME}, "required": ["title"],
                       "additionalProperties": False},
    "top-level-array": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 5},
    "matrix": {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}}}, "required": ["matrix"]},
    "nullable": {"type": "object", "properties": {"ok": {"type": "boolean"},
                                                  "error": {"type": ["string", "null"], "maxLength": 20}},
                 "required": ["ok", "error"]},
}


def _json_chat(client, name: str, schema: dict, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of a json_schema chat request, streamed or not."""
    kwargs = dict(model=DEFAULT_MODEL, max_tokens=200, temperature=0,
                  messages=[{"role": "user", "content": f"Give me an example {name.replace('-', ' ')} as JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": name.replace("-", "_"), "schema": schema}})
    if not stream:
        out = client.chat.completions.create(**kwargs)
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def closed(schema):
    """The schema with every object closed (additionalProperties false) and every integer
    bounded: what a 135M model may add or repeat must not depend on the CPU's bf16 rounding."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    if out.get("type") == "integer":
        out.setdefault("minimum", -999)
        out.setdefault("maximum", 99999)
    return out


SCHEMAS = {name: closed(schema) for name, schema in SCHEMAS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_json_schema_outputs_validate_on_the_default_model(default_server, stream):
    client = default_server.openai()
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch: the masks of 10 grammars per step
        results = dict(zip(SCHEMAS, pool.map(lambda n: _json_chat(client, n, SCHEMAS[n], stream), SCHEMAS)))
    for name, (text, finish_reason) in results.items():
        assert finish_reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert_idle(default_server)


@pytest.mark.slow
def test_json_object_and_vllm_guided_json(default_server):
    client = default_server.openai()
    messages = [{"role": "user", "content": 'Return a JSON object with the key "answer" for: what is 2+2?'}]
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=200, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    schema = SCHEMAS["enums"]
    out = client.completions.create(model=DEFAULT_MODEL, prompt="A T-shirt as JSON:", max_tokens=60, temperature=0,
                                    extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(out.choices[0].text), schema)


@pytest.mark.slow
def test_regex_and_choice_hold_on_every_sample_at_temperature_1(default_server):
    client = default_server.openai()
    pattern = r"[A-Z][a-z]{2,8}, [0-9]{1,3} (km|mi)"
    out = client.completions.create(model=DEFAULT_MODEL, prompt="A city and its distance:", n=4, temperature=1,
                                    seed=7, max_tokens=30, extra_body={"structured_outputs": {"regex": pattern}})
    assert len(out.choices) == 4 and all(re.fullmatch(pattern, c.text) for c in out.choices), out.choices
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=DEFAULT_MODEL, prompt="Another one:", n=4, temperature=1,
                                           max_tokens=30, stream=True, extra_body={"guided_regex": pattern}):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert len(streamed) == 4 and all(re.fullmatch(pattern, text) for text in streamed.values()), streamed
    options = ["yes", "no", "it depends"]
    out = client.chat.completions.create(model=DEFAULT_MODEL, n=4, temperature=1, max_tokens=10,
                                         messages=[{"role": "user", "content": "Is water wet?"}],
                                         extra_body={"structured_outputs": {"choice": options}})
    assert all(c.message.content in options and c.finish_reason == "stop" for c in out.choices), out.choices
    assert_idle(default_server)


@pytest.mark.slow
def test_logprobs_under_a_constraint_are_of_the_emitted_tokens(default_server):
    client = default_server.openai()
    out = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=2, messages=[{"role": "user", "content": "Pick a colour."}],
                                         extra_body={"guided_choice": ["red", "green", "blue"]})
    choice = out.choices[0]
    assert choice.message.content in ("red", "green", "blue")
    assert "".join(entry.token for entry in choice.logprobs.content) == choice.message.content
    assert all(entry.logprob <= 0 and len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)


def test_free_requests_keep_their_greedy_output_beside_constrained_ones(tiny_server):
    prompts = [f"Free prompt number {i} about" for i in range(6)]
    body = {"model": TINY_MODEL, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    def complete(prompt: str, **extra) -> str:
        with tiny_server.client() as client:
            response = client.post("/v1/completions", json={**body, "prompt": prompt, **extra})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    alone = [complete(p) for p in prompts]
    constrained = {"temperature": 1.0, "structured_outputs": {"regex": "[a-z ]{1,40}"}, "ignore_eos": False}
    with ThreadPoolExecutor(12) as pool:
        free = [pool.submit(complete, p) for p in prompts]
        bound = [pool.submit(complete, f"Constrained {i}", **constrained) for i in range(6)]
        assert [f.result() for f in free] == alone
        assert all(re.fullmatch("[a-z ]{1,40}", b.result()) for b in bound)
    assert_idle(tiny_server)
