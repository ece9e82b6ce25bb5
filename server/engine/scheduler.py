"""Scheduler: the continuous-batching policy that picks what each engine step computes.

Plain Python over `Sequence` objects and the `BlockManager` (no torch). Each step it returns a
list of chunks, "compute these tokens of this sequence", mixing decode tokens and prefill chunks
under two budgets: tokens per step (`max_num_batched_tokens`) and running sequences
(`max_num_seqs`). With speculative decoding on, a decode may also reserve lookahead slots for
draft tokens that the engine's proposer fills before the forward (server/engine/speculative.py).
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from server.engine.kv_cache import BlockManager
from server.engine.sequence import FinishReason, Sequence, SequenceStatus
from server.engine.step_plan import ScheduledChunk, SchedulerOutput


class RequestRejected(ValueError):
    """A request that can never run: longer than the context or bigger than the KV pool."""


@dataclass(slots=True)
class _Step:
    """Budgets and results of the `schedule()` call in progress."""

    token_budget: int
    seq_budget: int                 # free running slots left for admissions
    chunks: dict[int, ScheduledChunk] = field(default_factory=dict)   # seq_id -> chunk
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_speculative_tokens: int = 0,
        speculative_max_batch: int = 0,
        free_drafts: bool = False,
    ) -> None:
        assert max_num_seqs >= 1 and max_num_batched_tokens >= 1 and max_model_len >= 1
        assert num_speculative_tokens >= 0
        self.block_manager = block_manager
        self.num_speculative_tokens = num_speculative_tokens  # K: lookahead slots per decode, 0 = off
        self.speculative_max_batch = speculative_max_batch    # more running than this: no lookahead
        self.free_drafts = free_drafts                        # proposals cost nothing (n-gram lookup)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # in admission order: oldest first
        self.num_preemptions = 0              # cumulative

    # ---- queues -----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        """Returns: True while any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a new sequence at the back of `waiting` (or the front, for forked choices).

        Args:
            seq: a fresh sequence.
            front: queue it first, e.g. the sibling choices of a request already running.
        Raises:
            RequestRejected: prompt + max_tokens exceed the context length, or the blocks for
                them exceed the whole KV pool (the request could never run).
        """
        self.check_admissible(seq.num_prompt_tokens, seq.params.max_tokens)
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Raises RequestRejected when a prompt of this length could never run (see `add`)."""
        # max_tokens None reserves nothing: the engine stops such a seq at the context length.
        num_tokens = num_prompt_tokens + (max_tokens or 0)
        request = f"the request has {num_prompt_tokens} prompt tokens"
        if max_tokens is not None:
            request += f" and max_tokens {max_tokens}"
        if num_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens; {request}"
            )
        bm = self.block_manager
        if bm.num_blocks_needed(num_tokens) > bm.num_blocks:
            raise RequestRejected(
                f"The KV cache holds {bm.num_blocks * bm.block_size} tokens ({bm.num_blocks} "
                f"blocks of {bm.block_size}); {request}"
            )

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark a sequence finished, free its blocks and drop it from the queues.

        Args:
            seq: a waiting or running sequence; finishing a finished one does nothing.
            reason: why it ended.
        """
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every waiting or running sequence of a request with ABORT.

        Args:
            request_id: the request to cancel.
        Returns:
            The sequences aborted; [] for an unknown or already finished request.
        """
        live = itertools.chain(self.running, self.waiting)
        seqs = [seq for seq in live if seq.request_id == request_id]
        for seq in seqs:
            self.finish(seq, FinishReason.ABORT)
        return seqs

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Record that the step ran: advance computed counts and cache newly full blocks.

        Called by the engine after the forward pass and after it appended the sampled tokens
        (the accepted drafts must be in `seq.token_ids` before their blocks are hashed). A
        speculative chunk advances by its last token plus the accepted drafts; blocks reserved
        for rejected drafts are given back.

        Args:
            output: what `schedule()` returned for this step.
        """
        for chunk in output.chunks:
            seq = chunk.seq
            assert not seq.is_finished, "aborts are applied between steps, never during one"
            num_rejected = len(chunk.draft_token_ids) - chunk.num_accepted
            # a sequence that stopped inside its accepted drafts kept fewer tokens: clamp
            seq.num_computed_tokens = min(seq.num_computed_tokens + chunk.num_new_tokens - num_rejected,
                                          seq.num_tokens)
            self.block_manager.commit_computed_blocks(seq)
            if chunk.num_spec_slots:
                self.block_manager.trim(seq, seq.num_tokens)

    # ---- scheduling -------------------------------------------------------------------------

    # One step, in three phases, oldest sequences first everywhere (FCFS):
    #
    # 1. Decodes: every running sequence with exactly one uncomputed token (the token sampled
    #    last step) gets that token, so streaming requests advance every step. With speculative
    #    decoding, while at most `speculative_max_batch` sequences run, each decode that may
    #    speculate also reserves K lookahead slots, if the blocks for them are free (speculation
    #    never preempts anyone: short on memory, it backs off to a plain decode).
    # 2. Prefill continuation: running sequences still working through their prompt (chunked
    #    prefill) get as many tokens as the token budget has left.
    # 3. Admission: waiting sequences, front first, reuse their cached prefix and get a chunk of
    #    what remains, while tokens and sequence slots last. The first one that does not fit
    #    stops admission (no skipping ahead), and nothing is admitted in a step that preempted.
    #
    # When a running sequence needs a block and none is free, the NEWEST running sequence is
    # preempted by recompute: its blocks are freed, its computed count reset, and it goes back
    # to the FRONT of `waiting`, keeping its output tokens to be recomputed later. The victim
    # may be a decode scheduled earlier in this step (phase 2 runs after phase 1); its chunk is
    # then withdrawn and its tokens returned to the budget. If the newest is the sequence
    # itself, it preempts itself and gets nothing this step.
    def schedule(self) -> SchedulerOutput:
        """Pick the chunks of the next step.

        Returns:
            The chunks to compute, the sequences preempted, and the total number of tokens.
        """
        step = _Step(self.max_num_batched_tokens, self.max_num_seqs - len(self.running))

        # Phase 1: decodes, one token each (plus lookahead slots when speculating).
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        speculate = len(self.running) <= self.speculative_max_batch and self.num_speculative_tokens > 0
        for seq in decodes:
            if step.token_budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            slots = self._num_lookahead_slots(seq, step) if speculate else 0
            if slots and self.block_manager.can_allocate(seq, 1 + slots):
                self.block_manager.allocate(seq, 1 + slots)
                self._add_chunk(seq, 1, step, slots)
            elif self._make_room(seq, 1, step):
                self._add_chunk(seq, 1, step)

        # Phase 2: running sequences still prefilling, as much as the budget allows.
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            if step.token_budget == 0:
                break
            num_new_tokens = min(seq.num_uncomputed_tokens, step.token_budget)
            if seq.status is SequenceStatus.RUNNING and self._make_room(seq, num_new_tokens, step):
                self._add_chunk(seq, num_new_tokens, step)

        # Phase 3: admit waiting sequences, unless memory was short enough to preempt.
        if not step.preempted:
            self._admit_waiting(step)

        return self._close_step(step)

    def _num_lookahead_slots(self, seq: Sequence, step: _Step) -> int:
        """Draft tokens a decode may verify this step: its adaptive budget (K at first; see
        speculative.after_verification), capped so that the step can never emit past
        max_tokens or the context (it emits at most the drafts plus one token). A lone
        sequence with a free proposer (n-gram) always gets K: its extra rows cost the step
        little, and a draft that fails costs nothing to make."""
        if not seq.params.speculative or (seq.params.seed is not None and not seq.params.greedy):
            return 0  # opted out; seeded sampling keeps its tokens independent of batch size
        budget = self.num_speculative_tokens
        if seq.spec_budget is not None and not (self.free_drafts and len(self.running) == 1):
            if seq.spec_budget == 0 and seq.num_output_tokens < seq.spec_resume_at:
                return 0  # its drafts kept failing: paused for a while
            budget = max(seq.spec_budget, 1)
        slots = min(budget, step.token_budget - 1, self.max_model_len - seq.num_tokens)
        if seq.params.max_tokens is not None:
            slots = min(slots, seq.params.max_tokens - seq.num_output_tokens - 1)
        return max(slots, 0)

    def _make_room(self, seq: Sequence, num_new_tokens: int, step: _Step) -> bool:
        """Allocate blocks for a running seq, preempting the newest running ones if needed."""
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new_tokens)
        return True

    def _admit_waiting(self, step: _Step) -> None:
        bm = self.block_manager
        while self.waiting and step.token_budget > 0 and step.seq_budget > 0:
            seq = self.waiting[0]
            # Prompt scoring (prompt_logprobs) needs logits at every prompt position: no reuse.
            matched = seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None
            if matched:
                bm.match_prefix(seq)
            num_new_tokens = min(seq.num_uncomputed_tokens, step.token_budget)
            if not bm.can_allocate(seq, num_new_tokens):
                if matched:
                    bm.undo_match_prefix(seq)
                break
            bm.allocate(seq, num_new_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.seq_budget -= 1
            self._add_chunk(seq, num_new_tokens, step)

    def _add_chunk(self, seq: Sequence, num_new_tokens: int, step: _Step, num_spec_slots: int = 0) -> None:
        step.chunks[seq.seq_id] = ScheduledChunk(seq, num_new_tokens, num_spec_slots)
        step.token_budget -= num_new_tokens + num_spec_slots

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        step.preempted.append(seq)
        step.seq_budget += 1
        chunk = step.chunks.pop(seq.seq_id, None)
        if chunk is not None:              # scheduled earlier in this step: withdraw it
            step.token_budget += chunk.num_new_tokens + chunk.num_spec_slots

    def _close_step(self, step: _Step) -> SchedulerOutput:
        chunks = list(step.chunks.values())
        num_batched_tokens = sum(chunk.num_new_tokens + chunk.num_spec_slots for chunk in chunks)
        assert num_batched_tokens + step.token_budget == self.max_num_batched_tokens
        assert 0 <= step.token_budget and num_batched_tokens <= self.max_num_batched_tokens
        assert len(self.running) + step.seq_budget == self.max_num_seqs
        assert 0 <= step.seq_budget and len(self.running) <= self.max_num_seqs
        assert all(chunk.num_new_tokens >= 1 for chunk in chunks)
        assert len({id(chunk.seq) for chunk in chunks}) == len(chunks), "a seq scheduled twice"
        assert all(chunk.seq.status is SequenceStatus.RUNNING for chunk in chunks)
        return SchedulerOutput(chunks, step.preempted, num_batched_tokens)
