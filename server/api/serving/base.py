"""What every serving module shares: model check, sampling params, starting engine requests,
collecting or streaming their deltas, SSE framing, and aborting when the client goes away.

Work that grows with the input (tokenizing, rendering the chat template, compiling a grammar)
runs in a worker thread (`asyncio.to_thread`), so one long prompt does not stall every stream.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from models.chat_template import supports_tools
from models.tokenizer import Tokenizer
from server.api.errors import APIError, error_body
from server.api.protocol import ChatMessage, SamplingFields
from server.api.tool_format import hermes_messages
from server.api.tool_protocol import ToolDefinition
from server.api.responses import Usage
from server.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from server.engine.outputs import merge_delta
from server.engine.grammar import InvalidGrammar
from server.engine.outputs import ChoiceDelta
from server.engine.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"
RETRY_AFTER_S = 1


class Serving:
    """Holds the engine client and the model facts handlers need (all read-only)."""

    def __init__(self, async_engine: AsyncEngine, model_name: str):
        self.engine = async_engine
        self.model_name = model_name
        self.tokenizer: Tokenizer = async_engine.engine.tokenizer
        self.max_model_len: int = async_engine.engine.max_model_len
        self.vocab_size: int = async_engine.engine.vocab_size
        self.grammars = async_engine.engine.grammars

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [i for i in token_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside [0, {self.vocab_size})", param=param)

    async def sampling_params(self, body: SamplingFields) -> SamplingParams:
        """The engine's params; an output constraint is compiled here, so a bad one is a 400
        that names its field (the engine then finds it in the compiler's cache)."""
        try:
            constraint = body.constraint
            params = body.to_sampling_params()
        except ValueError as error:
            raise APIError(400, str(error)) from error
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        if constraint is not None:
            param, spec = constraint
            try:
                await asyncio.to_thread(self.grammars.compile, spec)
            except InvalidGrammar as error:
                raise APIError(400, f"{param}: {error}", param=param) from error
        return params

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def chat_prompt_ids(self, messages: list[ChatMessage], tools: list[ToolDefinition] = ()) -> list[int]:
        return await asyncio.to_thread(self._chat_prompt_ids, messages, list(tools))

    def _chat_prompt_ids(self, messages: list[ChatMessage], tools: list[ToolDefinition]) -> list[int]:
        """The conversation through the chat template, with the generation prompt. Tools go
        through the template when it renders them, else into a Hermes-style system prompt."""
        dicts = [m.to_template_dict() for m in messages]
        has_tool_turns = any(m.role == "tool" or m.tool_calls for m in messages)
        try:
            if supports_tools(self.tokenizer.chat_template):
                text = self.tokenizer.apply_chat_template(
                    dicts, tools=[t.model_dump(exclude_none=True) for t in tools] or None)
            else:
                text = self.tokenizer.apply_chat_template(
                    hermes_messages(dicts, tools) if tools or has_tool_turns else dicts)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos and self.tokenizer.add_bos_token:
            ids = ids[1:]  # the template wrote a BOS and encode() added another
        return ids

    async def start(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                    param: str) -> RequestStream:
        """Hand the prompts to the engine; every refusal becomes its 4xx/503 here."""
        try:
            return await self.engine.add(request_id, prompts, params)
        except QueueFullError as error:
            raise APIError(429, f"The server is busy: {error}. Retry later.",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from error
        except EngineDeadError as error:
            raise APIError(503, str(error)) from error
        except ValueError as error:  # RequestRejected: the message states the limit and lengths
            raise APIError(400, str(error), param=param) from error


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                 total_tokens=num_prompt_tokens + num_completion_tokens)


async def collect(stream: RequestStream) -> dict[tuple[int, int], ChoiceDelta]:
    """Run a request to the end. Returns (prompt index, choice index) -> merged delta."""
    merged: dict[tuple[str, int], ChoiceDelta] = {}
    try:
        async for _, delta in stream:
            merge_delta(merged, delta)
    except EngineDeadError as error:  # the engine loop died under this request: 503, as streams say
        raise APIError(503, str(error)) from error
    index_of = {rid: i for i, rid in enumerate(stream.request_ids)}
    return {(index_of[rid], index): delta for (rid, index), delta in merged.items()}


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_events(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """SSE frames of `chunks`, an error frame if the engine dies, always a final [DONE]."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except EngineDeadError as error:
        yield sse(error_body(503, str(error)))
    yield SSE_DONE


class EngineStreamingResponse(StreamingResponse):
    """SSE response that closes (aborts) its engine stream however the response ends,
    even when the client leaves before the first chunk."""

    def __init__(self, chunks: AsyncIterator[BaseModel], stream: RequestStream):
        super().__init__(sse_events(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def until_disconnected(raw: Request, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run `work()` unless the client disconnects first; then cancel it (its finally aborts)."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nobody reads it; the request was aborted
    return task.result()


async def _wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass
