"""Hermes tool-call format without a model: the streaming parser against the whole-text parse,
the prompt rewrite for templates without tool support, templates that render tools, and the
forced-call grammar accepting exactly valid calls."""
from __future__ import annotations

import json

import pytest

from models.chat_template import render_chat, supports_tools
from server.api.tool_format import CALL_CLOSE, CALL_OPEN, ToolCallParser, forced_call_grammar, hermes_messages
from server.api.tool_protocol import ToolDefinition

WEATHER = ToolDefinition.model_validate({"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
TIME = ToolDefinition.model_validate({"type": "function", "function": {"name": "get_time"}})

OUTPUT = ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
          "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>")


def parse_in_pieces(text: str, size: int) -> tuple[str, list]:
    parser = ToolCallParser({"get_weather", "get_time"})
    content, calls = [], []
    for i in range(0, len(text), size):
        piece, new = parser.feed(text[i:i + size])
        content.append(piece)
        calls += new
    tail, more = parser.finish()
    return "".join(content) + tail, calls + more


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_parse_equals_whole_parse(size):
    content, calls = parse_in_pieces(OUTPUT, size)
    assert content.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_held_back_text_is_released_when_it_is_not_a_tag():
    parser = ToolCallParser({"f"})
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("box> b") == ("<toolbox> b", [])
    assert parser.finish() == ("", [])


@pytest.mark.parametrize("body", ["{not json}", '{"name": "unknown", "arguments": {}}', '["get_time"]',
                                  '{"name": "get_time", "arguments": 5}'])
def test_invalid_calls_stay_content(body):
    text = f"x{CALL_OPEN}{body}{CALL_CLOSE}y"
    assert parse_in_pieces(text, 4) == (text, [])


def test_unclosed_call_at_the_end_counts_when_it_parses():
    content, calls = parse_in_pieces(f'{CALL_OPEN}\n{{"name": "get_time", "arguments": "{{}}"}}', 5)
    assert content == "" and calls[0].name == "get_time" and calls[0].arguments == "{}"
    assert parse_in_pieces(f'{CALL_OPEN}{{"name": "get_ti', 5) == (f'{CALL_OPEN}{{"name": "get_ti', [])


def test_hermes_messages_put_tools_in_the_system_prompt_and_turn_results_into_user_turns():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "-3C"}]
    out = hermes_messages(messages, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.loads(out[0]["content"].split("<tools>\n")[1].split("\n</tools>")[0]) == WEATHER.model_dump(exclude_none=True)
    assert out[2] == {"role": "assistant", "content": f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n{CALL_CLOSE}'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n-3C\n</tool_response>"}
    assert hermes_messages([{"role": "user", "content": "hi"}], [TIME])[0]["role"] == "system"


def test_a_template_that_knows_tools_gets_them():
    template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    assert supports_tools(template) and not supports_tools(None) and not supports_tools("{{ messages }}")
    text = render_chat(template, [{"role": "user", "content": "hi"}], True, tools=[WEATHER.model_dump()])
    assert text == "TOOLS:get_weather;user: hi\n"  # trim_blocks eats the newline after endif
    assert render_chat(template, [{"role": "user", "content": "hi"}], True) == "user: hi\n"


def test_forced_call_grammar_accepts_exactly_valid_calls():
    llguidance = pytest.importorskip("llguidance")
    from server.engine.grammar import _grammar_text

    for parallel in (False, True):
        grammar = _grammar_text(forced_call_grammar([WEATHER, TIME], parallel))
        call = f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CALL_CLOSE}'
        ok = [call, f'{CALL_OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CALL_CLOSE}']
        bad = [f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{}}}}\n{CALL_CLOSE}',      # city required
               f'{CALL_OPEN}\n{{"name": "other", "arguments": {{}}}}\n{CALL_CLOSE}', "plain text"]
        two = call + "\n" + call
        for text, valid in [*[(t, True) for t in ok], *[(t, False) for t in bad], (two, parallel)]:
            assert _matches(llguidance, grammar, text) == valid, (parallel, text)


def _matches(llguidance, grammar: str, text: str) -> bool:
    """Whether `text` is a complete match (checked on bytes, no tokenizer involved)."""
    tokenizer = llguidance.LLTokenizer("byte")
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    ids = list(text.encode())
    return matcher.consume_tokens(ids) and matcher.is_accepting()
