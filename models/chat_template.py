"""Chat templates: a conversation -> one prompt string.

A checkpoint's template (Hugging Face `tokenizer_config.json` `chat_template`, or GGUF
`tokenizer.chat_template`) is Jinja source. It is rendered the way `transformers` does it: a
sandboxed environment with `trim_blocks`/`lstrip_blocks`, the `raise_exception` and
`strftime_now` helpers, a `tojson` filter that keeps non-ASCII text, and the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and `tools` when the request has
any (OpenAI's `{"type": "function", "function": {...}}` dicts, as transformers passes them).

Checkpoints without a template (GPT-2, nanoGPT) get a plain transcript instead:

    System: You are terse.
    User: Hi
    Assistant:
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool,
                bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None) -> str:
    """Render `messages` with `template`, or with the plain transcript when it is None.

    Raises ValueError when the template is not valid Jinja or rejects the conversation
    (templates call `raise_exception`, e.g. for roles that do not alternate).
    """
    if template is None:
        return render_plain_chat(messages, add_generation_prompt)
    try:
        return _compile(template).render(messages=messages, tools=tools or None,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template rejected these messages: {error}") from error


def supports_tools(template: str | None) -> bool:
    """Whether a template renders tool definitions itself (it reads the `tools` variable)."""
    return template is not None and "tools" in template


def render_plain_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    """The fallback format: one `Role: content` line per message, then `Assistant:`."""
    lines = [f"{message['role'].capitalize()}: {message['content']}" for message in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template source (every chat request renders it)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the checkpoint's chat template is not valid Jinja ({error}); "
                         "fix or remove `chat_template` in its tokenizer config") from error


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own `tojson` escapes HTML characters and non-ASCII text; templates expect JSON.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                      sort_keys=sort_keys)
