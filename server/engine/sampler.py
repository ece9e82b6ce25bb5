"""Sampler: pick the next token of every sequence in a batch from its (S, V) logits.

Shapes: S sequences that sample this step, V vocabulary, K top logprobs returned, T prompt
positions (echo scoring).

One call runs a fixed pipeline of batched tensor stages in float32. Each stage is skipped when no
row of the batch uses it, so an all-greedy batch without penalties is one argmax:

    raw logprobs -> penalties -> min_tokens mask -> [grammar mask*] -> argmax (greedy rows, done)
                 -> temperature -> top_k + top_p (one sort) -> min_p -> exponential race
                 -> [grammar check**: rejected rows get their mask and draw again]

    *  rows under a grammar that truncate (top_k / top_p / min_p): masked before drawing
    ** other rows under a grammar: their draw is checked, and masked only if it is not allowed

Rows differ only through small per-row parameter tensors of shape (S, 1), and a stage a row does
not use is an exact identity for it (divide by 1, subtract 0, keep all V), so a row's tokens never
depend on its batch companions. Seeded rows draw their noise from their own generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.cpu_kernels import load_kernel
from server.engine.grammar import GrammarCompiler, apply_bitmask
from server.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """One sequence that samples this step."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # seeded per request, on the logits' device; None: global RNG
    stop_token_ids: list[int]          # EOS (unless ignore_eos) + params.stop_token_ids
    grammar: Any = None                # the sequence's llguidance matcher (structured output)


@dataclass
class SamplerOutput:
    token_ids: Tensor             # (S,) int64
    logprobs: Tensor | None       # (S,) float32, of the sampled token under the raw logits
    top_token_ids: Tensor | None  # (S, K) int64, K = max params.logprobs over rows
    top_logprobs: Tensor | None   # (S, K) float32, sorted descending


class Sampler:
    """Batched sampling; stateless, the per-request state lives in the rows (on a CPU device the
    argmax kernel is built with the sampler, at load, never during a request).

    Structured output (rows with a grammar) comes in two ways, both exact:
    - `grammar_bitmask` (S, W): masks computed before sampling, for rows that truncate the
      distribution (top_k / top_p / min_p act on the masked distribution, as everywhere else);
    - `grammars`: greedy and plain-temperature rows sample without a mask first, and only a row
      whose token its grammar rejects gets its mask and samples again. For greedy rows the
      argmax is the masked argmax whenever the grammar allows it; for sampled rows, accepting
      an unmasked draw that falls in the allowed set and redrawing from the masked distribution
      otherwise gives exactly the masked distribution (rejection sampling). Most tokens of a
      model that follows its schema pass, and checking one token costs microseconds where a
      mask costs ~0.1 ms a row.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        if torch.device(device).type == "cpu":
            argmax_kernel()

    def __call__(self, logits: Tensor, rows: list[SamplingRow], grammar_bitmask: Tensor | None = None,
                 grammars: GrammarCompiler | None = None, with_logprobs: bool = True) -> SamplerOutput:
        """with_logprobs=False: the caller scores the tokens it keeps itself (token_logprobs)."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        logits = logits.to(torch.float32)  # (S, V) the stages never edit the caller's tensor
        wants_logprobs = with_logprobs and any(r.params.logprobs is not None for r in rows)
        raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None  # (S, V)
        logits = apply_penalties(logits, rows)
        logits = mask_stop_tokens(logits, rows)
        if grammar_bitmask is not None:  # (S, W) from GrammarCompiler.fill_bitmask; free rows all ones
            logits = apply_bitmask(logits, grammar_bitmask)
        token_ids = draw(logits, rows)  # (S,)
        lazy = [i for i, r in enumerate(rows) if r.grammar is not None and not needs_mask_first(r.params)]
        if lazy and grammars is not None:  # None: grammar_bitmask already masks every constrained row
            token_ids = self._redraw_rejected(logits, rows, token_ids, lazy, grammars)
        return _with_logprobs(token_ids, raw_logprobs, rows)

    @staticmethod
    def _redraw_rejected(logits: Tensor, rows: list[SamplingRow], token_ids: Tensor, lazy: list[int],
                         grammars: GrammarCompiler) -> Tensor:
        """Rows whose unmasked token their grammar rejects: mask them and draw again."""
        drawn = token_ids.tolist()
        rejected = [i for i in lazy if not grammars.accepts(rows[i].grammar, drawn[i])]
        if not rejected:
            return token_ids
        index = torch.tensor(rejected, device=logits.device)  # (S',)
        bitmask = grammars.fill_bitmask([rows[i].grammar for i in rejected], logits.shape[1])  # (S', W)
        token_ids[index] = draw(apply_bitmask(logits[index], bitmask), [rows[i] for i in rejected])  # (S',)
        return token_ids


def needs_mask_first(params: SamplingParams) -> bool:
    """Whether a constrained row must be masked before sampling: top_k, top_p and min_p
    truncate the masked distribution, which an unmasked draw cannot stand in for."""
    return not params.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)


def first_argmax(x: Tensor) -> Tensor:
    """(S, V) float32 -> (S,) int64, the index of each row's first maximum: torch.argmax's answer
    for finite or -inf rows (NaN is never the maximum here). On CPU a C++ pass
    (models/csrc/argmax.cpp): ATen's max(dim) does not vectorize there and took 80 us for one
    50k-token row, 0.9 ms for 32."""
    kernel = argmax_kernel() if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 else None
    return x.argmax(dim=-1) if kernel is None else kernel.first_argmax(x)


def argmax_kernel():
    """The compiled first_argmax module, or None where it cannot be built (ATen's argmax runs)."""
    return load_kernel("nanoserve_argmax", "argmax.cpp")


def draw(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """One token per row of final (S, V) logits: argmax for greedy rows, sampled otherwise."""
    token_ids = first_argmax(logits)  # (S,) final for greedy rows
    # only non-greedy rows draw noise: a seeded greedy row leaves its generator untouched
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)  # (S',)
        token_ids[index] = sample(logits[index], [rows[i] for i in sampled])  # (S',)
    return token_ids


def sample(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Draw one token per row of non-greedy (S, V) logits; returns (S,) int64."""
    logits = apply_temperature(logits, rows)
    logits = apply_top_k_top_p(logits, rows)
    probs = logits.softmax(dim=-1)  # (S, V)
    probs = apply_min_p(probs, rows)
    return exponential_race(probs, [r.generator for r in rows])


def _per_row(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (S, 1)


def token_counts(token_lists: list[list[int]], like: Tensor) -> Tensor:
    """How often each token id occurs in each row's list, as an (S, V) float tensor."""
    lengths = torch.tensor([len(t) for t in token_lists])  # (S,)
    row_index = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)  # (N,)
    col_index = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64)  # (N,)
    counts = torch.zeros_like(like)  # (S, V)
    ones = torch.ones(len(col_index), dtype=like.dtype, device=like.device)  # (N,)
    counts.index_put_((row_index.to(like.device), col_index.to(like.device)), ones, accumulate=True)
    return counts


def apply_penalties(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Repetition (HF/CTRL, prompt + output) then presence/frequency (OpenAI, output only).

    A repeated token's logit is divided by the repetition penalty when positive and multiplied
    by it when negative, so a penalty > 1 always makes it less likely. Then
    logit -= presence * (count > 0) + frequency * count over the output tokens.
    """
    repetition = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in repetition):
        seen = token_counts([r.prompt_token_ids + r.output_token_ids if p != 1.0 else []
                             for r, p in zip(rows, repetition)], logits) > 0  # (S, V)
        penalty = _per_row(repetition, logits)  # (S, 1)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)  # (S, V)
        logits = torch.where(seen, penalised, logits)  # (S, V)
    presence = [r.params.presence_penalty for r in rows]
    frequency = [r.params.frequency_penalty for r in rows]
    if any(presence) or any(frequency):
        counts = token_counts([r.output_token_ids if p or f else []
                               for r, p, f in zip(rows, presence, frequency)], logits)  # (S, V)
        logits = logits - _per_row(frequency, logits) * counts  # (S, V)
        logits = logits - _per_row(presence, logits) * (counts > 0)  # (S, V)
    return logits


def mask_stop_tokens(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Forbid EOS and stop ids (-inf) for rows that have not produced min_tokens yet."""
    # A grammar decides alone when its text is complete (its mask may allow nothing but EOS).
    masked = [r.stop_token_ids if len(r.output_token_ids) < r.params.min_tokens and r.grammar is None
              else [] for r in rows]
    if not any(masked):
        return logits
    hits = token_counts(masked, logits) > 0  # (S, V)
    return logits.masked_fill(hits, float("-inf"))  # (S, V)


def apply_temperature(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    temperatures = [r.params.temperature for r in rows]
    assert all(t > 0.0 for t in temperatures), "greedy rows never reach sampling"
    if all(t == 1.0 for t in temperatures):
        return logits
    return logits / _per_row(temperatures, logits)  # (S, V)


def apply_top_k_top_p(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Keep each row's top_k most likely tokens, then the smallest nucleus of mass >= top_p.

    Only the rows that truncate are sorted (the sort is the sampler's most expensive step).
    """
    vocab_size = logits.shape[-1]
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab_size else vocab_size for r in rows]
    top_p = [r.params.top_p for r in rows]
    truncated = [i for i in range(len(rows)) if top_k[i] < vocab_size or top_p[i] < 1.0]
    if not truncated:
        return logits
    index = torch.tensor(truncated, device=logits.device)  # (S',)
    kept = _truncate_sorted(logits[index], [top_k[i] for i in truncated],
                            [top_p[i] for i in truncated])  # (S', V)
    return logits.index_put((index,), kept)  # (S, V)


def _truncate_sorted(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """top_k then top_p on one descending sort of (S, V) logits; dropped tokens become -inf.

    In sorted order the nucleus keeps position i while the mass strictly before it is below
    top_p; position 0 has no mass before it, so the most likely token always survives. The
    survivors are scattered back to vocabulary order.
    """
    vocab_size = logits.shape[-1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # (S, V)
    if any(k < vocab_size for k in top_k):
        ranks = torch.arange(vocab_size, device=logits.device)  # (V,)
        k = torch.tensor(top_k, device=logits.device).unsqueeze(1)  # (S, 1)
        sorted_logits.masked_fill_(ranks >= k, float("-inf"))  # (S, V)
    if any(p < 1.0 for p in top_p):
        probs = sorted_logits.softmax(dim=-1)  # (S, V)
        mass_before = probs.cumsum(dim=-1) - probs  # (S, V)
        p = _per_row(top_p, logits)  # (S, 1)
        # p == 1 keeps everything even when float error pushes the cumulative mass past 1
        drop = (mass_before >= p) & (p < 1.0)  # (S, V)
        sorted_logits.masked_fill_(drop, float("-inf"))  # (S, V)
    return torch.empty_like(logits).scatter_(-1, sorted_ids, sorted_logits)  # (S, V)


def apply_min_p(probs: Tensor, rows: list[SamplingRow]) -> Tensor:
    """Zero the tokens whose probability is below min_p times the row's top probability.

    The result is left unnormalised: the exponential race only compares probabilities within a
    row, so scaling a row does not change its winner.
    """
    min_p = [r.params.min_p for r in rows]
    if not any(min_p):
        return probs
    threshold = _per_row(min_p, probs) * probs.amax(dim=-1, keepdim=True)  # (S, 1)
    return probs.masked_fill(probs < threshold, 0.0)  # (S, V)


def exponential_noise(like: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Exp(1) noise q = -log(u), u ~ U[0, 1), one (V,) draw per row, shaped like the (S, V) probs.

    Unseeded rows share one batched draw; a seeded row draws from its own generator, advancing
    it once per token. (-log of torch.rand rather than exponential_(): on CPU it is ~5x faster,
    and u = 0 gives q = inf, a token that loses, instead of q = 0 and a NaN from 0 / 0.)
    """
    u = torch.empty_like(like)  # (S, V)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        u.uniform_()
    else:
        if unseeded:
            u[unseeded] = torch.rand_like(u[unseeded])  # (S_unseeded, V)
        for i, generator in enumerate(generators):
            if generator is not None:
                u[i] = torch.rand(u.shape[1], generator=generator, device=u.device)  # (V,)
    return u.log_().neg_()  # (S, V)


def exponential_race(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Sample token i with probability probs[i] as argmax(probs / q), q ~ Exp(1) i.i.d.

    Token i "arrives" at time q_i / p_i, an exponential wait with rate p_i; the first arrival
    is token i with probability p_i / sum(p). No normalisation and no cumsum are needed, and
    each row's winner depends only on that row's probabilities and noise.
    """
    q = exponential_noise(probs, generators)  # (S, V)
    return first_argmax(probs / q)  # (S,)


def target_probs(logits: Tensor, rows: list[SamplingRow], grammar_bitmask: Tensor | None = None) -> Tensor:
    """The normalized (S, V) distribution that sampling non-greedy rows draws from: every stage
    of the pipeline (penalties, min_tokens, grammar mask, temperature, top_k/top_p, min_p).
    Speculative verification compares draft tokens against it."""
    logits = apply_penalties(logits.to(torch.float32), rows)  # (S, V)
    logits = mask_stop_tokens(logits, rows)
    if grammar_bitmask is not None:
        logits = apply_bitmask(logits, grammar_bitmask)
    logits = apply_top_k_top_p(apply_temperature(logits, rows), rows)
    probs = apply_min_p(logits.softmax(dim=-1), rows)  # (S, V)
    return probs / probs.sum(dim=-1, keepdim=True)


def token_logprobs(logits: Tensor, token_ids: Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """Raw-logit logprobs of given tokens (S,) and each row's top-k, from (S, V) logits."""
    return _with_logprobs(token_ids, logits.to(torch.float32).log_softmax(dim=-1), rows)


def _with_logprobs(token_ids: Tensor, raw_logprobs: Tensor | None,
                   rows: list[SamplingRow]) -> SamplerOutput:
    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    k = max(r.params.logprobs or 0 for r in rows)
    logprobs = raw_logprobs.gather(-1, token_ids.unsqueeze(1)).squeeze(1)  # (S,)
    top_logprobs, top_token_ids = raw_logprobs.topk(k, dim=-1)  # (S, K), (S, K)
    return SamplerOutput(token_ids, logprobs, top_token_ids, top_logprobs)


def prompt_logprobs(logits: Tensor, target_ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Score prompt tokens (echo): logits (T, V) at each position, target_ids (T,) the next token.

    Returns the (T,) logprob of each target, the (T, k) top token ids and their (T, k) logprobs.
    """
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)  # (T, V)
    target = logprobs.gather(-1, target_ids.long().unsqueeze(1)).squeeze(1)  # (T,)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (T, k), (T, k)
    return target, top_ids, top_logprobs
