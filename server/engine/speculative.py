"""Speculative decoding: guess K next tokens cheaply, check them all in one target forward.

    schedule   a decode reserves K lookahead slots (blocks + token budget), unless more than
               `max_batch` sequences run, the request opted out, or memory is short
    propose    fill the slots: n-gram lookup in the sequence's own tokens, or a draft model
    verify     one target forward over [last token, d1 .. dK] (K+1 positions, paged KV); keep
               the longest run of drafts the target agrees with, plus one token of its own
               (the correction at the first disagreement, or a bonus token when all K pass)
    roll back  rejected drafts' K/V slots are not counted as computed (the next step writes
               over them) and the blocks reserved past the kept tokens go back to the pool

Greedy rows keep a draft when it equals the target's argmax at its position, so their output is
token for token what plain decoding gives. Sampled rows use rejection sampling (Leviathan et
al., arXiv 2211.17192, Algorithm 1): a draft d drawn from q is kept with probability
min(1, p(d) / q(d)), and at the first rejection the token is drawn from max(0, p - q)
renormalized; every emitted token is then distributed exactly as a plain draw from p. The n-gram
proposer is deterministic (q is a point mass on d): it keeps d with probability p(d) and
otherwise draws from p with d removed.

Legend: K draft tokens of one sequence, V vocabulary.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.step_plan import ScheduledChunk

log = logging.getLogger(__name__)

PAUSE_TOKENS = 16  # a sequence whose draft budget fell to zero decodes this many tokens plainly


@dataclass
class SpeculativeConfig:
    method: str                        # "ngram" or "draft"
    num_tokens: int = 4                # K: draft tokens verified per step
    draft_model: str | None = None     # model spec of the draft ("draft" only)
    draft_num_layers: int | None = None  # keep only the draft's first layers (a layer-truncated copy)
    max_batch: int = 8                 # speculate only while at most this many sequences run
    ngram_min: int = 1                 # shortest suffix that counts as a match
    ngram_max: int = 4                 # longest suffix looked up

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"unknown speculative method {self.method!r}; use ngram or draft:<model spec>")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("draft speculation needs a model spec: --speculative draft:<spec>")
        if self.num_tokens < 1:
            raise ValueError("--num-speculative-tokens must be at least 1")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("n-gram sizes must satisfy 1 <= min <= max")

    @classmethod
    def parse(cls, text: str, **kwargs) -> "SpeculativeConfig":
        """'ngram' or 'draft:<model spec>' (the --speculative flag)."""
        method, _, spec = text.partition(":")
        return cls(method, draft_model=spec or None, **kwargs)

    def describe(self) -> str:
        if self.method == "ngram":
            return f"n-gram prompt lookup ({self.ngram_min}..{self.ngram_max}-grams), K={self.num_tokens}"
        layers = f", first {self.draft_num_layers} layers" if self.draft_num_layers else ""
        return f"draft model {self.draft_model}{layers}, K={self.num_tokens}"


# ---- proposers ---------------------------------------------------------------------------------


def ngram_lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix (min_n..max_n
    tokens) of `tokens`; [] when no suffix of min_n tokens occurred before. Among equally long
    matches the most recent one with k tokens after it wins (in a repeating run the latest
    match is followed by fewer than k).

        tokens = a b c d a b c   suffix "a b c" also at 0 -> propose "d a b" (k = 3)
    """
    num_tokens = len(tokens)
    if num_tokens < min_n + 1:
        return []
    last = tokens[-1]
    reversed_tokens = tokens[::-1]  # C-speed search for earlier occurrences of the last token
    best, best_end = (0, 0), -1     # (match length, continuation length), newest first on ties
    j = 0
    while True:
        try:
            j = reversed_tokens.index(last, j + 1)
        except ValueError:
            break
        end = num_tokens - 1 - j  # tokens[end] == last, and tokens[end + 1] exists
        length = 1
        while length < max_n and end - length >= 0 and tokens[end - length] == tokens[-1 - length]:
            length += 1
        score = (length, min(k, j))  # j tokens follow tokens[end]
        if score > best:
            best, best_end = score, end
            if score == (max_n, k):
                break
    if best[0] < min_n:
        return []
    return tokens[best_end + 1: best_end + 1 + k]


class NgramProposer:
    """Prompt lookup decoding: the draft is what followed the same n-gram earlier in the
    sequence (prompt and output). Free to propose; pays off on text that repeats its input
    (rewriting, summarizing, code edits)."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            drafts = ngram_lookup(chunk.seq.token_ids, chunk.num_spec_slots, self.config.ngram_min, self.config.ngram_max)
            if drafts:
                chunk.set_drafts(drafts)

    def release(self, seq_id: int) -> None:
        pass


@dataclass
class _DraftState:
    num_preemptions: int       # the seq's count when the draft KV was written (a preemption frees its blocks)
    num_stable: int            # the draft has KV for token_ids[:num_stable] (never change afterwards)
    speculated: list[int]      # and for these tokens after them (drafts it fed itself)


class DraftProposer:
    """A smaller model with the same tokenizer proposes K tokens autoregressively.

    Its KV pool has the target's block layout and is addressed through the target's block
    tables, so the block manager, prefix caching and preemption need nothing new: the draft
    catches up on whatever tokens it has no KV for (the whole prompt the first time, one or two
    tokens per step after that), then decodes K - 1 more single-token steps.
    """

    def __init__(self, config: SpeculativeConfig, runner, target_vocab_size: int):
        self.config, self.runner = config, runner  # a ModelRunner over the draft model and its pool
        self.vocab_size = target_vocab_size
        self._states: dict[int, _DraftState] = {}

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    @torch.inference_mode()
    def propose(self, chunks: list[ScheduledChunk]) -> None:
        if not chunks:
            return
        starts = [self._num_valid(chunk.seq) for chunk in chunks]
        # catch up: every token without draft KV, the last one included -> the first draft token
        queries = [chunk.seq.token_ids[start:] for chunk, start in zip(chunks, starts)]
        hidden = self.runner.forward(queries, [c.seq.num_tokens for c in chunks], [c.seq.block_table for c in chunks])
        drafts: list[list[int]] = [[] for _ in chunks]
        probs: list[list[Tensor]] = [[] for _ in chunks]
        self._draw(hidden, chunks, range(len(chunks)), drafts, probs)
        for i in range(1, max(c.num_spec_slots for c in chunks)):
            active = [j for j, c in enumerate(chunks) if c.num_spec_slots > i]
            hidden = self.runner.forward([[drafts[j][-1]] for j in active],
                                         [chunks[j].seq.num_tokens + i for j in active],
                                         [chunks[j].seq.block_table for j in active])
            self._draw(hidden, chunks, active, drafts, probs)
        for chunk, tokens, q in zip(chunks, drafts, probs):
            seq = chunk.seq
            self._states[seq.seq_id] = _DraftState(seq.num_preemptions, seq.num_tokens, tokens[:-1])
            chunk.set_drafts(tokens, torch.stack(q) if q and q[0] is not None else None)

    def _num_valid(self, seq) -> int:
        """Leading tokens of `seq` whose draft KV is in the pool."""
        state = self._states.get(seq.seq_id)
        if state is None or state.num_preemptions != seq.num_preemptions:
            return 0
        valid = state.num_stable
        for token in state.speculated:
            if valid >= seq.num_tokens - 1 or seq.token_ids[valid] != token:
                break
            valid += 1
        return min(valid, seq.num_tokens - 1)

    def _draw(self, hidden: Tensor, chunks, active, drafts, probs) -> None:
        """One draft token per active sequence: argmax for greedy requests, else a draw from
        softmax(logits / temperature), whose distribution is kept for the verification."""
        logits = self.runner.model.compute_logits(hidden).float()  # (S', V_draft)
        if logits.shape[1] < self.vocab_size:  # a draft with fewer padding ids than the target
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - logits.shape[1]), value=float("-inf"))
        logits = logits[:, :self.vocab_size]  # (S', V)
        params = [chunks[j].seq.params for j in active]
        drawn = logits.argmax(-1)  # (S',) final for greedy rows
        sampled = [row for row, p in enumerate(params) if not p.greedy]
        q = {}
        if sampled:
            rows = torch.stack([logits[row] / params[row].temperature for row in sampled]).softmax(-1)  # (S'', V)
            drawn = torch.cat((drawn, torch.multinomial(rows, 1)[:, 0]))  # (S' + S'',) read back together
            q = dict(zip(sampled, rows.unbind(0)))
        tokens = drawn.tolist()  # one device->host copy a draft step
        for k, row in enumerate(sampled):
            tokens[row] = tokens[len(params) + k]
        for row, j in enumerate(active):
            drafts[j].append(tokens[row])
            probs[j].append(q.get(row))


def load_draft_model(config: SpeculativeConfig, target):
    """Load the draft model beside the target (same dtype and device), truncated to its first
    `draft_num_layers` layers when asked, and check that it shares the target's tokenizer.

    Raises:
        ModelLoadError: the draft cannot be loaded, is too short, or tokenizes differently.
    """
    from models.loader import ModelLoadError, load_model

    draft = load_model(config.draft_model, target.dtype, target.device)
    num_layers = len(draft.model.attention_layers())
    if config.draft_num_layers is not None:
        if not 1 <= config.draft_num_layers <= num_layers:
            raise ModelLoadError(f"--draft-num-layers must be in 1..{num_layers} for draft {config.draft_model!r}")
        draft.model.keep_first_layers(config.draft_num_layers)
    a, b = draft.tokenizer, target.tokenizer
    same = a.vocab_size == b.vocab_size and a.stop_token_ids == b.stop_token_ids and all(
        a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size))
    if not same:
        raise ModelLoadError(f"the draft model {config.draft_model!r} does not share the tokenizer of "
                             f"{target.name!r}; a draft must propose token ids the target reads the same way")
    return draft


# ---- verification ------------------------------------------------------------------------------


def after_verification(chunks: list[ScheduledChunk], stats, max_drafts: int) -> None:
    """Count a step's verifications in its StepStats and adapt each sequence's draft budget.

    One more draft after a step that kept them all (up to K), one fewer after a rejection; at
    zero the sequence stops speculating for PAUSE_TOKENS output tokens, then tries one draft
    again. Rows cost little at batch 1 but a full step at batch 8, so a sequence whose drafts
    keep failing (text that does not repeat itself) must stop paying for them.
    """
    for chunk in chunks:
        drafts, seq = len(chunk.draft_token_ids), chunk.seq
        if not drafts:
            continue
        stats.num_spec_drafts += 1
        stats.num_spec_draft_tokens += drafts
        stats.num_spec_accepted_tokens += chunk.num_accepted
        budget = max_drafts if seq.spec_budget is None else max(seq.spec_budget, 1)
        seq.spec_budget = min(max_drafts, budget + 1) if chunk.num_accepted == drafts else budget - 1
        if seq.spec_budget == 0:
            seq.spec_resume_at = seq.num_output_tokens + PAUSE_TOKENS


def accept_greedy(target_ids: list[int], drafts: list[int]) -> int:
    """Drafts kept: the run of leading drafts equal to the target's argmax at their position."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_ids[accepted]:
        accepted += 1
    return accepted


def accept_sampled(p: Tensor, drafts: list[int], q: Tensor | None) -> tuple[int, int | None]:
    """Rejection sampling of K drafts against the target's (K+1, V) probabilities.

    Args:
        p: target distributions after all sampling settings, rows 0..K (row i predicts the token
            after draft i; row K is for the bonus token).
        drafts: the K draft tokens.
        q: (K, V) the draft model's distributions, or None for a deterministic proposal.
    Returns:
        (drafts kept, the token drawn at the first rejection); None when all K were kept (the
        caller draws the bonus token from row K).
    """
    index = torch.tensor(drafts, device=p.device)  # (K,)
    rows = torch.arange(len(drafts), device=p.device)  # (K,)
    p_draft = p[rows, index]  # (K,)
    q_draft = torch.ones_like(p_draft) if q is None else q[rows, index]  # (K,)
    keep = torch.rand(len(drafts), device=p.device) < (p_draft / q_draft).clamp(max=1.0)  # (K,)
    rejected = (~keep).nonzero()
    if rejected.numel() == 0:
        return len(drafts), None
    first = int(rejected[0, 0])
    if q is None:
        residual = p[first].clone()  # (V,) p without the rejected draft
        residual[drafts[first]] = 0.0
    else:
        residual = (p[first] - q[first]).clamp(min=0.0)  # (V,)
    if residual.sum() <= 0:  # p == q exactly, where rejection has probability 0: keep p
        residual = p[first]
    return first, int(torch.multinomial(residual, 1))


def draft_quantization(method: str | None, draft_spec: str) -> str | None:
    """The draft runs the target's --quantization: int8 and int4 from any checkpoint; gguf keeps
    the draft's own 4-bit tensors where the draft is a GGUF file, and leaves any other draft in
    the model dtype (it has no quantized tensors to keep)."""
    if method != "gguf":
        return method
    from models.gguf_quantized import gguf_path

    try:
        gguf_path(draft_spec)
    except ValueError:
        return None
    return method
