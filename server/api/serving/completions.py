"""POST /v1/completions: one engine request per prompt, choices indexed prompt * n + choice.

`echo` prefixes each choice with its prompt; with `logprobs` the prompt tokens are scored too
(the first one has no context, so its logprob is null), and `max_tokens: 0` stops right there:
the evaluation-harness way of scoring a text.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from server.api.protocol import CompletionRequest
from server.api.responses import CompletionChoice, CompletionLogprobs, CompletionResponse
from server.api.serving.base import EngineStreamingResponse, Serving, collect, until_disconnected, usage
from server.api.serving.logprobs import completion_logprobs, extend
from server.engine.async_engine import RequestStream
from server.engine.outputs import ChoiceDelta


@dataclass
class _Prompt:
    ids: list[int]
    text: str | None   # None when given as token ids: decoded only if echoed


@dataclass
class _Job:
    body: CompletionRequest
    request_id: str
    prompts: list[_Prompt]


class CompletionServing(Serving):
    async def create(self, body: CompletionRequest, raw: Request):
        self.check_model(body.model)
        params = await self.sampling_params(body)
        job = _Job(body, f"cmpl-{uuid.uuid4().hex}", [await self._prompt(p) for p in body.prompts()])
        stream = await self.start(job.request_id, [p.ids for p in job.prompts], params, "prompt")
        if body.stream:
            return EngineStreamingResponse(self._chunks(job, stream), stream)
        try:
            return await until_disconnected(raw, lambda: self._respond(job, stream))
        finally:
            stream.close()

    async def _prompt(self, prompt: str | list[int]) -> _Prompt:
        if isinstance(prompt, str):
            return _Prompt(await self.encode(prompt), prompt)
        self.check_token_ids(prompt, "prompt")
        return _Prompt(list(prompt), None)

    async def _respond(self, job: _Job, stream: RequestStream) -> CompletionResponse:
        merged = await collect(stream)
        n = job.body.n
        choices = [self._choice(job, p, merged[(p, i)], p * n + i)
                   for p in range(len(job.prompts)) for i in range(n)]
        num_generated = sum(d.num_output_tokens for d in merged.values())
        return CompletionResponse(id=job.request_id, model=self.model_name, choices=choices,
                                  usage=usage(sum(len(p.ids) for p in job.prompts), num_generated))

    def _choice(self, job: _Job, p: int, delta: ChoiceDelta, index: int) -> CompletionChoice:
        prefix, logprobs = self._echo(job, p, delta)
        if job.body.logprobs is not None:
            generated = completion_logprobs(self.tokenizer, delta.token_ids, delta.logprobs or [], len(prefix))
            logprobs = extend(logprobs, generated) if logprobs else generated
        return CompletionChoice(index=index, text=prefix + delta.text, logprobs=logprobs,
                                finish_reason=delta.finish_reason)

    def _echo(self, job: _Job, p: int, delta: ChoiceDelta) -> tuple[str, CompletionLogprobs | None]:
        """The prompt text to prefix, and its logprobs when asked for ("", None without echo)."""
        if not job.body.echo:
            return "", None
        prompt = job.prompts[p]
        text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.ids)
        if job.body.logprobs is None:
            return text, None
        entries = delta.prompt_logprobs or [None] * len(prompt.ids)
        return text, completion_logprobs(self.tokenizer, prompt.ids, entries, 0)

    async def _chunks(self, job: _Job, stream: RequestStream) -> AsyncIterator[CompletionResponse]:
        n, offsets, num_generated = job.body.n, {}, {}
        async for p, delta in stream:
            index = p * n + delta.index
            prefix, logprobs = self._echo(job, p, delta) if index not in offsets else ("", None)
            offset = offsets.get(index, 0) + len(prefix)
            if job.body.logprobs is not None:
                generated = completion_logprobs(self.tokenizer, delta.token_ids, delta.logprobs or [], offset)
                logprobs = extend(logprobs, generated) if logprobs else generated
            offsets[index], num_generated[index] = offset + len(delta.text), delta.num_output_tokens
            text = prefix + delta.text
            if text or delta.finished or (logprobs and logprobs.tokens):
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=delta.finish_reason)
                yield CompletionResponse(id=job.request_id, model=self.model_name, choices=[choice])
        if job.body.include_usage:
            yield CompletionResponse(id=job.request_id, model=self.model_name, choices=[],
                                     usage=usage(sum(len(p.ids) for p in job.prompts), sum(num_generated.values())))
