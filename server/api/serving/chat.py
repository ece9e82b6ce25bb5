"""POST /v1/chat/completions: messages through the chat template, one engine request, n choices.

Streaming sends, per choice, a first chunk with `role: "assistant"`, then content deltas, then
the finish reason; `stream_options.include_usage` adds a last chunk with `choices: []`.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from server.api.protocol import ChatCompletionRequest
from server.api.responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                  ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut)
from server.api.serving.base import EngineStreamingResponse, Serving, collect, until_disconnected, usage
from server.api.serving.logprobs import chat_logprobs
from server.engine.async_engine import RequestStream
from server.engine.outputs import ChoiceDelta


class ChatServing(Serving):
    async def create(self, body: ChatCompletionRequest, raw: Request):
        self.check_model(body.model)
        params = self.sampling_params(body)
        prompt_ids = self.chat_prompt_ids(body.messages)
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
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=merged[(0, i)].text),
                              logprobs=self._logprobs(body, merged[(0, i)]),
                              finish_reason=merged[(0, i)].finish_reason)
                   for i in range(body.n)]
        num_generated = sum(d.num_output_tokens for d in merged.values())
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=usage(num_prompt_tokens, num_generated))

    def _chunk(self, request_id: str, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice])

    async def _chunks(self, body: ChatCompletionRequest, request_id: str, num_prompt_tokens: int,
                      stream: RequestStream) -> AsyncIterator[ChatCompletionChunk]:
        for i in range(body.n):
            yield self._chunk(request_id, ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
        num_generated: dict[int, int] = {}
        async for _, delta in stream:
            num_generated[delta.index] = delta.num_output_tokens
            logprobs = self._logprobs(body, delta) if delta.token_ids else None
            if delta.text or delta.finished or logprobs:
                content = ChatDelta(content=delta.text if delta.text else None)
                yield self._chunk(request_id, ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs,
                                                              finish_reason=delta.finish_reason))
        if body.include_usage:
            yield ChatCompletionChunk(id=request_id, model=self.model_name, choices=[],
                                      usage=usage(num_prompt_tokens, sum(num_generated.values())))
