"""POST /v1/chat/completions: messages through the chat template, one engine request, n choices.

Streaming sends, per choice, a first chunk with `role: "assistant"`, then content deltas, then
the finish reason; `stream_options.include_usage` adds a last chunk with `choices: []`.

With tools, each choice's text goes through a ToolCallParser (server/api/tool_format.py): tagged
calls become `tool_calls` (a streamed call comes whole in one delta, once its closing tag is
read) and the finish reason becomes "tool_calls".
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from server.api.protocol import ChatCompletionRequest
from server.api.responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut,
                                  FunctionCallOut, ToolCallDelta, ToolCallOut)
from server.api.serving.base import EngineStreamingResponse, Serving, collect, until_disconnected, usage
from server.api.serving.logprobs import chat_logprobs
from server.api.tool_format import ParsedCall, ToolCallParser
from server.engine.async_engine import RequestStream
from server.engine.outputs import ChoiceDelta


class ChatServing(Serving):
    async def create(self, body: ChatCompletionRequest, raw: Request):
        self.check_model(body.model)
        params = await self.sampling_params(body)
        prompt_ids = await self.chat_prompt_ids(body.messages, body.active_tools)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self.start(request_id, [prompt_ids], params, "messages")
        if body.stream:
            return EngineStreamingResponse(self._chunks(body, request_id, len(prompt_ids), stream), stream)
        try:
            return await until_disconnected(raw, lambda: self._respond(body, request_id, len(prompt_ids), stream))
        finally:
            stream.close()

    def _logprobs(self, body: ChatCompletionRequest, delta: ChoiceDelta) -> ChatLogprobs | None:
        if not body.logprobs:
            return None
        return chat_logprobs(self.tokenizer, delta.token_ids, delta.logprobs or [])

    async def _respond(self, body: ChatCompletionRequest, request_id: str, num_prompt_tokens: int,
                       stream: RequestStream) -> ChatCompletionResponse:
        merged = await collect(stream)
        choices = [self._choice(body, i, merged[(0, i)]) for i in range(body.n)]
        num_generated = sum(d.num_output_tokens for d in merged.values())
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage(num_prompt_tokens, num_generated))

    def _choice(self, body: ChatCompletionRequest, index: int, delta: ChoiceDelta) -> ChatChoice:
        content, calls, finish_reason = delta.text, [], delta.finish_reason
        parser = _parser(body)
        if parser is not None:
            head, calls = parser.feed(delta.text)
            tail, more = parser.finish()
            content, calls = head + tail, calls + more
            finish_reason = _finish_reason(finish_reason, parser)
        message = ChatMessageOut(content=(content.strip() or None) if calls else content,
                                 tool_calls=[_call_out(call) for call in calls] or None)
        return ChatChoice(index=index, message=message, logprobs=self._logprobs(body, delta),
                          finish_reason=finish_reason)

    def _chunk(self, request_id: str, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice])

    async def _chunks(self, body: ChatCompletionRequest, request_id: str, num_prompt_tokens: int,
                      stream: RequestStream) -> AsyncIterator[ChatCompletionChunk]:
        for i in range(body.n):
            yield self._chunk(request_id, ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        num_generated: dict[int, int] = {}
        parsers = {i: _parser(body) for i in range(body.n)}
        async for _, delta in stream:
            num_generated[delta.index] = delta.num_output_tokens
            logprobs = self._logprobs(body, delta) if delta.token_ids else None
            text, calls, finish_reason = _parse_step(parsers[delta.index], delta)
            if text or calls or delta.finished or logprobs:
                tool_calls = _call_deltas(parsers[delta.index], calls)
                content = ChatDelta(content=text or None, tool_calls=tool_calls)
                yield self._chunk(request_id, ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs,
                                                              finish_reason=finish_reason))
        if body.include_usage:
            yield ChatCompletionChunk(id=request_id, model=self.model_name, choices=[],
                                      usage=usage(num_prompt_tokens, sum(num_generated.values())))


def _parser(body: ChatCompletionRequest) -> ToolCallParser | None:
    tools = body.active_tools
    return ToolCallParser({t.function.name for t in tools}) if tools else None


def _parse_step(parser: ToolCallParser | None, delta: ChoiceDelta) -> tuple[str, list[ParsedCall], str | None]:
    """One streamed delta through the choice's parser: content, new calls, finish reason."""
    if parser is None:
        return delta.text, [], delta.finish_reason
    text, calls = parser.feed(delta.text)
    if not delta.finished:
        return text, calls, None
    tail, more = parser.finish()
    return text + tail, calls + more, _finish_reason(delta.finish_reason, parser)


def _finish_reason(reason: str | None, parser: ToolCallParser) -> str | None:
    return "tool_calls" if parser.calls and reason == "stop" else reason


def _call_out(call: ParsedCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


def _call_deltas(parser: ToolCallParser | None, calls: list[ParsedCall]) -> list[ToolCallDelta] | None:
    """Streamed calls, indexed by their position among all of the choice's calls."""
    if not calls:
        return None
    first = len(parser.calls) - len(calls)
    return [ToolCallDelta(index=first + k, id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for k, c in enumerate(calls)]
