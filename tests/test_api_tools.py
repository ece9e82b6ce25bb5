"""Tool calling through the real server and the openai client on the real default model:
tool_choice required / named / auto / none, streamed deltas reassembling to the same calls,
arguments valid for the function's schema, and a conversation with tool results."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytest_plugins = ["tests.api_fixtures"]
pytest.register_assert_rewrite("tests.api_fixtures")

from tests.api_fixtures import DEFAULT_MODEL, assert_idle  # noqa: E402

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                                                          "required": ["tz"], "additionalProperties": False}}}]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
pytestmark = pytest.mark.slow


def create(server, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 120, **kwargs}
    return server.openai().chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, **kwargs)


def reassemble(chunks) -> tuple[str, list[tuple[str, str]], str]:
    """(content, [(name, arguments)], finish_reason) from streamed chunks, the way clients do it."""
    content, calls, finish_reason = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
            assert call.id is None or call.id == entry["id"] and call.type == "function"
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish_reason


def assert_valid_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_gives_valid_calls_and_streamed_deltas_reassemble_to_them(default_server):
    out = create(default_server, tool_choice="required", parallel_tool_calls=False)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.content is None
    calls = [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert_valid_calls(calls)
    assert all(c.id.startswith("call_") and c.type == "function" for c in message.tool_calls)
    content, streamed, finish_reason = reassemble(create(default_server, tool_choice="required", stream=True,
                                                        parallel_tool_calls=False))
    assert (content.strip(), streamed, finish_reason) == ("", calls, "tool_calls")
    # parallel calls allowed: a small model may go on calling until max_tokens; every call it
    # completed still parses and validates
    parallel = create(default_server, tool_choice="required", max_tokens=80).choices[0]
    assert_valid_calls([(c.function.name, c.function.arguments) for c in parallel.message.tool_calls])
    assert parallel.finish_reason in ("tool_calls", "length")


def test_named_function_is_called_exactly_once(default_server):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for out in [create(default_server, tool_choice=choice),
                create(default_server, tool_choice=choice, temperature=1.0, seed=3)]:
        calls = [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls]
        assert len(calls) == 1 and calls[0][0] == "get_time"
        assert_valid_calls(calls)


def test_auto_parses_a_call_when_the_model_writes_one(default_server):
    """Whether a 135M model decides to call is its own business; what it writes is forced here
    (a regex, not tool_choice) so the auto path's parsing is what is tested."""
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    regex = {"structured_outputs": {"regex": written.replace("{", r"\{").replace("}", r"\}")}}
    out = create(default_server, tool_choice="auto", extra_body=regex)
    calls = [(c.function.name, c.function.arguments) for c in out.choices[0].message.tool_calls]
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    assert out.choices[0].finish_reason == "tool_calls"
    assert reassemble(create(default_server, tool_choice="auto", stream=True, extra_body=regex))[1:] == (calls, "tool_calls")
    free = create(default_server, extra_body={"structured_outputs": {"regex": "It is sunny( today)?[.]"}})
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason == "stop"
    assert free.choices[0].message.content.startswith("It is sunny")


def test_none_hides_the_tools(default_server):
    out = create(default_server, tool_choice="none", max_tokens=40)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")


def test_conversation_with_tool_results_continues(default_server):
    first = create(default_server, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    out = default_server.openai().chat.completions.create(model=DEFAULT_MODEL, messages=messages, tools=TOOLS,
                                                          temperature=0, max_tokens=40)
    assert out.choices[0].message.content or out.choices[0].message.tool_calls
    with default_server.client() as client:  # the earlier call and its result reach the prompt
        ids = client.post("/tokenize", json={"messages": messages}).json()["tokens"]
        text = client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "<tool_call>" in text and "<tool_response>" in text and '"sky": "clear"' in text
    assert_idle(default_server)
