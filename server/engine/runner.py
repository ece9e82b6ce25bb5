"""ModelRunner: the one place where a scheduled step becomes tensors and tensors become tokens.

Per step it packs every scheduled chunk into `input_ids (N,)` and `positions (N,)`, builds the
attention metadata (slot mapping, block tables, context lengths, query offsets), runs one
forward over the whole mixed batch, computes logits only for the rows that sample (plus the
prompt rows of requests that asked for prompt logprobs), and samples them in one batched call.
Rows under a grammar (structured output) get their token bitmask from llguidance on a side
thread while the forward runs, so the mask costs the step little more than its application.

Legend: N tokens in the packed batch, S sampling rows, C channels, V vocab, K top logprobs.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from models.attention import DecodeWorkspace, build_attention_metadata
from models.fast_linear import pack_linear_layers
from models.fused_attention import decode_kernel, describe_decode_path
from models.loader import LoadedModel
from server.engine.grammar import GrammarCompiler
from server.engine.sampler import Sampler, SamplingRow, needs_mask_first, prompt_logprobs
from server.engine.scheduler import ScheduledChunk, SchedulerOutput
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)

TokenLogprobs = tuple[float, list[tuple[int, float]]]  # logprob of the chosen token, top-k (id, logprob)


@dataclass(slots=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprobs: TokenLogprobs | None  # only when the request asked for logprobs


@dataclass(slots=True)
class PromptLogprobs:
    seq: Sequence
    start: int                       # prompt position of the first entry (the first token has none)
    entries: list[tuple[int, TokenLogprobs]]  # (target token id, its logprobs) per position


@dataclass(slots=True)
class StepResult:
    sampled: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs]


class ModelRunner:
    """Owns the model, its paged KV pool and the sampler."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, fast_kernels: bool = True,
                 grammars: GrammarCompiler | None = None):
        self.model, self.device, self.block_size = loaded.model, loaded.device, block_size
        self.stop_token_ids = list(loaded.tokenizer.stop_token_ids)
        spec = self.model.kv_cache_spec
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)  # (NB, BS, KVH, D)
        self.kv_caches = [
            (torch.zeros(shape, dtype=loaded.dtype, device=self.device),
             torch.zeros(shape, dtype=loaded.dtype, device=self.device))
            for _ in range(spec.num_layers)
        ]
        self.model.bind_kv_cache(self.kv_caches)
        self.workspace = DecodeWorkspace()
        self.use_fused_decode = False
        if fast_kernels:
            pack_linear_layers(self.model)
            self.use_fused_decode = self.device.type == "cpu" and decode_kernel() is not None
        if self.use_fused_decode:
            log.info("decode attention: %s", describe_decode_path(spec.head_dim))
        elif self.device.type == "cpu":
            log.info("decode attention: PyTorch gather + SDPA (fast kernels %s)", "off" if not fast_kernels else "unavailable")
        self.sampler = Sampler()
        self.grammars = grammars
        self.vocab_size = self.model.lm_head.out_features
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self.generators: dict[int, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> StepResult:
        """Run one forward for every chunk, sample the chunks that end at their last token.

        Args:
            output: the scheduler's step; chunks of one query are moved in front (decodes).
        Returns:
            Sampled tokens (and prompt logprobs) for the caller to append and check.
        """
        chunks = sorted(output.chunks, key=lambda c: c.num_new_tokens != 1)  # decodes first, stable
        input_ids, positions, query_lens, seq_lens = [], [], [], []
        for chunk in chunks:
            start, seq = chunk.seq.num_computed_tokens, chunk.seq
            input_ids += seq.token_ids[start:start + chunk.num_new_tokens]
            positions += range(start, start + chunk.num_new_tokens)
            query_lens.append(chunk.num_new_tokens)
            seq_lens.append(start + chunk.num_new_tokens)
        meta = build_attention_metadata(query_lens, seq_lens, [c.seq.block_table for c in chunks],
                                        self.block_size, self.device)
        meta.workspace, meta.use_fused_decode = self.workspace, self.use_fused_decode
        sampling = [i for i, c in enumerate(chunks) if c.samples and c.seq.params.max_tokens != 0]
        masks = self._start_grammar_masks([chunks[i].seq for i in sampling])
        hidden = self.model(
            torch.tensor(input_ids, device=self.device),  # (N,)
            torch.tensor(positions, device=self.device),  # (N,)
            meta,
        )  # (N, C)
        ends = meta.query_start_loc[1:]
        rows_at = torch.tensor([ends[i] - 1 for i in sampling], device=self.device, dtype=torch.long)
        sampled = self._sample(hidden[rows_at], [chunks[i] for i in sampling], masks)
        scored = [self._prompt_logprobs(hidden, meta.query_start_loc[i], c)
                  for i, c in enumerate(chunks) if c.seq.params.prompt_logprobs is not None
                  and c.seq.num_computed_tokens < c.seq.num_prompt_tokens]
        return StepResult(sampled, [s for s in scored if s.entries])

    def _start_grammar_masks(self, seqs: list[Sequence]) -> Future | None:
        """The bitmask of the rows that must be masked before sampling (needs_mask_first),
        computed by llguidance's threads while the forward runs (the matchers already hold every
        token sampled so far); None when no row needs one. Other constrained rows are checked
        after an unmasked draw (Sampler)."""
        matchers = [seq.grammar if needs_mask_first(seq.params) else None for seq in seqs]
        if all(m is None for m in matchers):
            return None
        return self._mask_thread.submit(self.grammars.fill_bitmask, matchers, self.vocab_size)

    def _sample(self, hidden: torch.Tensor, chunks: list[ScheduledChunk], masks: Future | None) -> list[SampledToken]:
        if not chunks:
            return []
        logits = self.model.compute_logits(hidden)  # (S, C) -> (S, V)
        rows = [self._sampling_row(c.seq) for c in chunks]
        out = self.sampler(logits, rows, masks.result() if masks is not None else None, self.grammars)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = []
        for i, chunk in enumerate(chunks):
            k = chunk.seq.params.logprobs
            entry = None
            if k is not None and logprobs is not None:
                entry = (logprobs[i], list(zip(top_ids[i][:k], top_lps[i][:k])) if k else [])
            results.append(SampledToken(chunk.seq, token_ids[i], entry))
        return results

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = seq.params
        generator = None
        if params.seed is not None:
            generator = self.generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + seq.choice_index)
                self.generators[seq.seq_id] = generator
        stop_ids = ([] if params.ignore_eos else self.stop_token_ids) + list(params.stop_token_ids)
        return SamplingRow(params, seq.prompt_token_ids, seq.output_token_ids, generator, stop_ids,
                           seq.grammar)

    def _prompt_logprobs(self, hidden: torch.Tensor, row_start: int, chunk: ScheduledChunk) -> PromptLogprobs:
        """Logprobs of prompt tokens start+1 .. predicted by this chunk's rows."""
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        end = min(start + chunk.num_new_tokens, seq.num_prompt_tokens - 1)  # last row predicting a prompt token
        if end <= start:
            return PromptLogprobs(seq, start + 1, [])
        logits = self.model.compute_logits(hidden[row_start:row_start + end - start])  # (T, V)
        targets = torch.tensor(seq.token_ids[start + 1:end + 1], device=self.device)  # (T,)
        k = seq.params.prompt_logprobs
        target_lp, top_ids, top_lps = prompt_logprobs(logits.float(), targets, k)
        top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
        entries = [(t, (lp, list(zip(top_ids[j], top_lps[j]))))
                   for j, (t, lp) in enumerate(zip(targets.tolist(), target_lp.tolist()))]
        return PromptLogprobs(seq, start + 1, entries)

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (its seeded generator) once it finished."""
        self.generators.pop(seq_id, None)
