"""Plain records the engine hands out: per-step deltas of each choice, and stats for metrics.

Nothing here knows about HTTP or Prometheus; the API layer turns deltas into OpenAI chunks and
the metrics layer turns stats into counters and histograms.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TokenLogprobs = tuple[float, list[tuple[int, float]]]  # chosen token's logprob, top-k (id, logprob)


@dataclass(slots=True)
class ChoiceDelta:
    """What one choice (sequence) of a request produced in one engine step."""

    request_id: str
    index: int                                  # choice index within the request (n > 1)
    token_ids: list[int]                        # tokens sampled this step
    text: str                                   # newly completed text, stop strings cut, never half a UTF-8 char
    logprobs: list[TokenLogprobs] | None = None  # one per token in token_ids, when asked for
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, when the prompt was scored
    finish_reason: str | None = None            # "stop" | "length" | "abort" once finished
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0                  # all tokens generated so far by this choice
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestStats:
    """Timings and sizes of one finished request (all its choices), for histograms."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    queue_time: float            # arrival -> first scheduled
    time_to_first_token: float | None
    e2e_latency: float


@dataclass(slots=True)
class StepStats:
    """One engine step, as the metrics layer wants it."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int = 0            # in this step
    num_prompt_tokens: int = 0          # prompt tokens of requests that got their first token (or ended prompt-only)
    num_generation_tokens: int = 0      # tokens sampled in this step
    num_prefix_queried_tokens: int = 0  # in this step
    num_prefix_hit_tokens: int = 0
    batch_size: int = 0                 # sequences in the forward pass
    num_batched_tokens: int = 0         # tokens in the forward pass
    num_spec_drafts: int = 0            # speculative verifications (sequences with >= 1 draft token)
    num_spec_draft_tokens: int = 0      # draft tokens verified
    num_spec_accepted_tokens: int = 0   # of which the target accepted
    expert_tokens: list[int] | None = None  # MoE: tokens routed to each expert, summed over MoE layers
    num_moe_layers: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[RequestStats] = field(default_factory=list)


def merge_delta(merged: dict[tuple[str, int], ChoiceDelta], delta: ChoiceDelta) -> None:
    """Accumulate one step's delta into the running total of its choice."""
    key = (delta.request_id, delta.index)
    if key not in merged:
        merged[key] = ChoiceDelta(delta.request_id, delta.index, [], "", None if delta.logprobs is None else [])
    total = merged[key]
    total.token_ids += delta.token_ids
    total.text += delta.text
    if delta.logprobs is not None:
        total.logprobs = (total.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs
    total.finish_reason = delta.finish_reason
    total.num_prompt_tokens, total.num_output_tokens = delta.num_prompt_tokens, delta.num_output_tokens
    total.num_cached_tokens = delta.num_cached_tokens
