"""Hermes-style tool calls: how tools are shown to the model, how its calls are constrained and
how they are read back out of its text.

The model writes each call as one JSON object between tags (Qwen2.5, SmolLM2, Hermes and most
open chat models are trained on this format):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- Prompt: a chat template that knows tools (it mentions `tools`) renders them itself. For one that
  does not, `hermes_messages()` rewrites the conversation: the tool signatures and the format go
  into the system message, earlier calls become tagged text, tool results become
  `<tool_response>` user turns.
- Constraint: `tool_choice` "required" or a named function compiles `forced_call_grammar()`, a
  Lark grammar whose JSON part is the functions' parameter schemas, so the call always parses.
- Parsing: `ToolCallParser` is fed text as it streams and hands back plain content and complete
  calls; text that may still become `<tool_call>` is held back until it can be decided.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.api.tool_protocol import ToolDefinition
from server.engine.sampling_params import GrammarSpec

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


# ---- prompt --------------------------------------------------------------------------------------

def hermes_messages(messages: list[dict], tools: list[ToolDefinition]) -> list[dict]:
    """`messages` for a template without tool support: tools described in the system message,
    assistant tool calls as tagged text, tool results as <tool_response> user turns."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(_call_text(call["function"]) for call in message["tool_calls"])
            content = f"{message['content']}\n{calls}" if message["content"] else calls
            out.append({"role": "assistant", "content": content})
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if tools:
        prompt = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_text(function: dict) -> str:
    body = {"name": function["name"], "arguments": function["arguments"]}
    return f"{CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_CLOSE}"


# ---- constraint ----------------------------------------------------------------------------------

def forced_call_grammar(tools: list[ToolDefinition], parallel: bool) -> GrammarSpec:
    """A grammar that admits only tagged calls to `tools` with arguments valid for their schemas:
    one call, or (parallel) one or more separated by newlines."""
    schemas = [{"type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": t.function.parameters_schema()},
                "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    lark = f'{start}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {json.dumps(body)}\n'
    return GrammarSpec("grammar", lark)


# ---- parsing -------------------------------------------------------------------------------------

@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


@dataclass
class ToolCallParser:
    """Splits streamed model text into content and complete tool calls to `tool_names`.

    A tagged block that is not a valid call (bad JSON, unknown function) stays content.
    """

    tool_names: set[str]
    _buffer: str = ""
    _in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Content that is certain by now, and calls completed by `text`."""
        self._buffer += text
        content, calls = [], []
        while True:
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):]
                self._in_call = False
                self._take(body, content, calls, closed=True)
                continue
            start = self._buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_tag_length(self._buffer)
                content.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            content.append(self._buffer[:start])
            self._buffer, self._in_call = self._buffer[start + len(CALL_OPEN):], True
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The rest at the end of the output: an unclosed call still counts if it parses."""
        content, calls = [], []
        if self._in_call:
            self._take(self._buffer, content, calls, closed=False)
        else:
            content.append(self._buffer)
        self._buffer, self._in_call = "", False
        return "".join(content), calls

    def _take(self, body: str, content: list[str], calls: list[ParsedCall], closed: bool) -> None:
        call = self._parse(body)
        if call is None:
            content.append(CALL_OPEN + body + (CALL_CLOSE if closed else ""))
        else:
            calls.append(call)
            self.calls.append(call)

    def _parse(self, body: str) -> ParsedCall | None:
        try:
            parsed = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(parsed, dict) or parsed.get("name") not in self.tool_names:
            return None
        arguments = parsed.get("arguments", parsed.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", parsed["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tag_length(text: str) -> int:
    """Length of the longest end of `text` that could be the start of CALL_OPEN."""
    for length in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-length:]):
            return length
    return 0
