"""A scheduled step packed into one forward's inputs: the compact, picklable message rank 0
sends every tensor-parallel worker, from which each rank builds the same tensors.

Legend: N tokens in the packed batch, R logit rows.
"""
from __future__ import annotations

from dataclasses import dataclass

from server.engine.step_plan import ScheduledChunk


@dataclass(slots=True)
class ForwardInputs:
    """One forward over a packed batch."""
    input_ids: list[int]              # (N,) every chunk's new tokens, decode-like chunks first
    query_lens: list[int]             # new tokens per chunk
    seq_lens: list[int]               # context per chunk after them
    block_tables: list[list[int]]
    num_decode_seqs: int | None       # leading chunks the decode kernel attends (None: count them)
    logit_rows: list[int]             # (R,) packed rows whose logits the step needs


@dataclass(slots=True)
class PromptScoring:
    """A chunk's rows that predict prompt tokens (prompt logprobs): logits rows [first, first + num)."""
    chunk: ScheduledChunk
    first: int
    num: int


def pack_forward_inputs(chunks: list[ScheduledChunk], sampling: list[ScheduledChunk]) -> tuple[ForwardInputs, list[PromptScoring]]:
    """Inputs for `chunks` (decode-like first, as sorted by the caller). The logit rows are the
    sampled positions of `sampling` (in order), then every prompt-logprob row; the scorings say
    where in the logits each chunk's prompt rows land."""
    inputs = ForwardInputs([], [], [], [c.seq.block_table for c in chunks], sum(map(is_decode_like, chunks)), [])
    ends = {}
    for chunk in chunks:
        start, seq = chunk.seq.num_computed_tokens, chunk.seq
        inputs.input_ids += seq.token_ids[start:start + chunk.num_new_tokens - len(chunk.draft_token_ids)]
        inputs.input_ids += chunk.draft_token_ids
        inputs.query_lens.append(chunk.num_new_tokens)
        inputs.seq_lens.append(start + chunk.num_new_tokens)
        ends[id(chunk)] = len(inputs.input_ids)
    inputs.logit_rows = [ends[id(c)] - num_sampled_rows(c) + i for c in sampling for i in range(num_sampled_rows(c))]
    scorings = []
    for chunk in chunks:
        num = num_prompt_rows(chunk)
        if chunk.seq.params.prompt_logprobs is not None and num > 0:
            scorings.append(PromptScoring(chunk, len(inputs.logit_rows), num))
            first_row = ends[id(chunk)] - chunk.num_new_tokens
            inputs.logit_rows += range(first_row, first_row + num)
    return inputs, scorings


def num_sampled_rows(chunk: ScheduledChunk) -> int:
    """Sampled positions of a sampling chunk: its last token, plus one per draft."""
    return 1 + len(chunk.draft_token_ids)


def num_prompt_rows(chunk: ScheduledChunk) -> int:
    """Rows of the chunk that predict a prompt token; the prompt's first token has none."""
    start = chunk.seq.num_computed_tokens
    return max(0, min(start + chunk.num_new_tokens, chunk.seq.num_prompt_tokens - 1) - start)


def is_decode_like(chunk: ScheduledChunk) -> bool:
    """Attended one row per token with the decode kernel: a decode or a verification chunk."""
    return chunk.num_new_tokens == 1 or bool(chunk.draft_token_ids)
