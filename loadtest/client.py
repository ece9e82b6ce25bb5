"""One OpenAI request, timed: the request body, the SSE reader, and the record a load run keeps.

Timing of a streamed request (all on the client's monotonic clock):

    send ──────────── first content chunk ── chunk ── chunk ─ ... ── [DONE]
    |<──── ttft ────>|<─ itl[0] ─>|<─ itl[1] ─>|
    |<─────────────────────────── e2e ──────────────────────────────────>|

An inter-token gap is measured between chunks that carry text; a chunk holding several tokens
counts as one gap (as vLLM's benchmark does). Output tokens come from the final usage chunk
(`stream_options.include_usage`), or from `usage` of a non-streamed answer.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

from loadtest.scenarios import RequestSpec


class RequestFailed(Exception):
    """A request that did not complete as the OpenAI contract says; the message is the reason."""


@dataclass(slots=True)
class RequestRecord:
    """What one request measured. Times in seconds; `error` is None for a success."""

    scenario: str
    endpoint: str
    stream: bool
    start: float                     # wall clock (time.time) when sent
    e2e: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def endpoint_for(api: str) -> str:
    return "/v1/chat/completions" if api == "chat" else "/v1/completions"


def build_body(spec: RequestSpec, api: str, model: str, stream: bool, ignore_eos: bool,
               temperature: float, seed: int | None) -> dict:
    """The JSON body for `spec` on the chat or completions endpoint."""
    body: dict = {"model": model, "max_tokens": spec.max_tokens, "temperature": temperature, "stream": stream}
    if api == "chat":
        messages = [{"role": "system", "content": spec.system}] if spec.system else []
        body["messages"] = messages + [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = f"{spec.system}\n\n{spec.prompt}" if spec.system else spec.prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True
    if seed is not None:
        body["seed"] = seed
    return body


def _chunk_text(chunk: dict) -> str:
    """The text a streamed chunk carries (completions `text` or chat `delta.content`)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def read_sse(lines: Iterable[bytes | str], record: RequestRecord, t_send: float,
             clock: Callable[[], float] = time.perf_counter) -> None:
    """Read an SSE stream into `record` (ttft, itl, tokens); raise RequestFailed on a bad stream."""
    last: float | None = None
    saw_done, saw_usage = False, False
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue                                  # blank separators, comments, event: lines
        data = line[5:].strip()
        if saw_done:
            raise RequestFailed("data after [DONE]")
        if data == "[DONE]":
            saw_done = True
            continue
        try:
            chunk = json.loads(data)
        except ValueError:
            raise RequestFailed(f"malformed SSE data: {data[:80]!r}") from None
        if "error" in chunk:
            raise RequestFailed(f"error in stream: {chunk['error'].get('message', chunk['error'])}")
        if chunk.get("usage"):
            saw_usage = True
            record.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            record.output_tokens = chunk["usage"].get("completion_tokens", 0)
        if _chunk_text(chunk):
            now = clock()
            if last is None:
                record.ttft = now - t_send
            else:
                record.itl.append(now - last)
            last = now
    if not saw_done:
        raise RequestFailed("stream ended without [DONE]")
    if not saw_usage:
        raise RequestFailed("stream had no usage chunk (stream_options.include_usage)")


def read_json(payload: dict, record: RequestRecord) -> None:
    """Take the token counts of a non-streamed answer."""
    usage = payload.get("usage")
    if not usage or not payload.get("choices"):
        raise RequestFailed("response without choices or usage")
    record.prompt_tokens = usage.get("prompt_tokens", 0)
    record.output_tokens = usage.get("completion_tokens", 0)


def http_error(status: int, text: str) -> RequestFailed:
    """`HTTP 429: <OpenAI error message>` (or the start of the body when it is not OpenAI-shaped)."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    return RequestFailed(f"HTTP {status}: {message}")


def send(session, base_url: str, spec: RequestSpec, api: str, body: dict, timeout: float = 600.0) -> RequestRecord:
    """POST `body` with a requests-compatible `session` and time it; never raises, see `.error`."""
    endpoint = endpoint_for(api)
    record = RequestRecord(spec.scenario, endpoint, body["stream"], time.time())
    t_send = time.perf_counter()
    try:
        with session.post(base_url + endpoint, json=body, stream=body["stream"], timeout=timeout) as resp:
            if resp.status_code != 200:
                raise http_error(resp.status_code, resp.text)
            if body["stream"]:
                read_sse(resp.iter_lines(), record, t_send)
            else:
                read_json(resp.json(), record)
    except RequestFailed as e:
        record.error = str(e)
    except Exception as e:                                    # connection reset, chunked encoding, timeout
        record.error = f"broken {'stream' if body['stream'] else 'response'}: {type(e).__name__}: {e}"
    record.e2e = time.perf_counter() - t_send
    return record
