"""What one engine step computes: the scheduler's chunks, filled by the proposer (speculative
drafts) and read by the model runner.

Plain data over `Sequence` objects, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledChunk:
    """Compute `seq.token_ids[seq.num_computed_tokens : +num_new_tokens]` in this step.

    A speculative decode computes its last token followed by `draft_token_ids` (K <= the
    `num_spec_slots` it reserved); the target verifies all 1 + K positions, and `num_accepted`
    of the drafts (set after the forward) are kept.
    """

    seq: Sequence
    num_new_tokens: int
    num_spec_slots: int = 0          # lookahead reserved at schedule time (blocks and budget)
    # True when the chunk reaches the end of seq.token_ids, so a token is sampled after it.
    # Frozen at schedule time: it stays right after update_after_step() moves the counters.
    samples: bool = field(init=False)
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: object = None       # (K, V) tensor: the draft model's sampling distributions, or None
    num_accepted: int = 0

    def __post_init__(self) -> None:
        end = self.seq.num_computed_tokens + self.num_new_tokens
        assert 1 <= self.num_new_tokens and end <= self.seq.num_tokens
        self.samples = end == self.seq.num_tokens

    def set_drafts(self, token_ids: list[int], probs=None) -> None:
        """Fill the lookahead slots with proposed tokens (at most num_spec_slots)."""
        assert len(token_ids) <= self.num_spec_slots and self.num_new_tokens == 1
        self.draft_token_ids, self.draft_probs = token_ids, probs
        self.num_new_tokens = 1 + len(token_ids)

    def keep_drafts(self, num: int) -> None:
        """Drop the drafts after the first `num` (e.g. the ones a grammar forbids)."""
        self.draft_token_ids = self.draft_token_ids[:num]
        if self.draft_probs is not None:
            self.draft_probs = self.draft_probs[:num] if num else None
        self.num_new_tokens = 1 + num


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]       # sent back to `waiting` in this step (stats)
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        return not self.chunks
