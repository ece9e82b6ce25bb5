"""Engine logprobs -> the two OpenAI shapes: completions (parallel lists) and chat (objects).

The engine gives, per token, (chosen logprob, [(id, logprob), ...top-k]), or None for the first
prompt token, which has no context. -inf (a token the sampler ruled out) is not valid JSON, so
values are floored at -9999.
"""
from __future__ import annotations

import math

from models.tokenizer import Tokenizer
from server.api.responses import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from server.engine.outputs import TokenLogprobs

LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else logprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int],
                        entries: list[TokenLogprobs | None], text_offset: int) -> CompletionLogprobs:
    """Completions shape; `text_offset` is where the first token starts in the choice text."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token_id)
        out.tokens.append(text)
        out.text_offset.append(text_offset)
        text_offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        logprob, top = entry
        out.token_logprobs.append(finite(logprob))
        top_dict = {token_text(tokenizer, i): finite(lp) for i, lp in top}
        top_dict.setdefault(text, finite(logprob))  # the chosen token is always listed
        out.top_logprobs.append(top_dict)
    return out


def extend(total: CompletionLogprobs, more: CompletionLogprobs) -> CompletionLogprobs:
    total.tokens += more.tokens
    total.token_logprobs += more.token_logprobs
    total.top_logprobs += more.top_logprobs
    total.text_offset += more.text_offset
    return total


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs(content=[_chat_token(tokenizer, i, entry) for i, entry in zip(token_ids, entries)])


def _chat_token(tokenizer: Tokenizer, token_id: int, entry: TokenLogprobs) -> TokenLogprob:
    logprob, top = entry
    return TokenLogprob(**_top(tokenizer, token_id, logprob).model_dump(),
                        top_logprobs=[_top(tokenizer, i, lp) for i, lp in top])


def _top(tokenizer: Tokenizer, token_id: int, logprob: float) -> TopLogprob:
    raw = tokenizer.token_bytes(token_id)
    return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=finite(logprob), bytes=list(raw))
