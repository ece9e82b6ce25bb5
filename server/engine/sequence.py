"""Sequence: the state of one generated completion (one choice of one request).

A request with `n > 1` becomes `n` sequences sharing a `request_id`. A sequence moves through an
explicit state machine, driven by the scheduler:

    WAITING --admitted--> RUNNING --finish/abort--> FINISHED
       ^                     |
       +-----preempted-------+   (blocks freed, num_computed_tokens reset, output kept)

Plain Python, no torch: the scheduler and block manager read and write these fields, the model
runner only reads them.
"""
from __future__ import annotations

import enum

from server.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # client went away or the request was cancelled


class Sequence:
    """Token ids and bookkeeping of one sequence.

    `token_ids` holds the prompt followed by the output, one list, so that recompute after a
    preemption and prefix hashing treat prompt and output tokens alike. The K/V of the first
    `num_computed_tokens` tokens are in the cache, in the blocks listed by `block_table`.
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        choice_index: int = 0,
    ) -> None:
        assert len(prompt_token_ids) >= 1, "a sequence needs at least one prompt token"
        self.seq_id = seq_id
        self.request_id = request_id
        self.params = params
        self.choice_index = choice_index  # i-th of a request's n choices (seeds are seed + i)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0   # tokens whose K/V are in the cache
        self.num_cached_tokens = 0     # prefix-cache hit tokens at the last admission (stats)
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.grammar = None  # llguidance matcher when params.grammar is set (advanced per token)
        self.spec_budget: int | None = None  # draft tokens to propose next (speculation adapts it); None: K
        self.spec_resume_at = 0              # budget 0: no drafts until this many output tokens
        # Timestamps for metrics, written by the engine.
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Append one sampled token; its K/V are computed in the next step that runs this seq."""
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
