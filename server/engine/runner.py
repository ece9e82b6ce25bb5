"""ModelRunner: the one place where a scheduled step becomes tensors and tensors become tokens.

Per step it packs every scheduled chunk into `input_ids (N,)` and `positions (N,)`, builds the
attention metadata (slot mapping, block tables, context lengths, query offsets), runs one
forward over the whole mixed batch, computes logits only for the rows that sample (plus the
prompt rows of requests that asked for prompt logprobs), and samples them in one batched call.
Rows under a grammar (structured output) get their token bitmask from llguidance on a side
thread while the forward runs, so the mask costs the step little more than its application.

A speculative chunk (last token + K draft tokens) samples at each of its K+1 positions, as K+1
"virtual" rows that see the drafts before them as output (penalties, min_tokens and the
grammar advance through them); server/engine/speculative.py decides how many drafts to keep.

Under tensor parallelism (server/engine/tp_workers.py) rank 0 sends each forward's inputs
(server/engine/forward_inputs.py) to the workers first and every rank runs the same forward on
its shard; the logits arrive whole on rank 0 only, which samples.

Legend: N tokens in the packed batch, S sampling rows, C channels, V vocab, K top logprobs.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate

import torch

from models.attention import DecodeWorkspace, build_attention_metadata
from models.kernels import bind_kernels, select_kernels
from models.quantization import is_quantized, quantize_model
from models.loader import LoadedModel
from models.mla import MLA_PATHS
from models.moe import drain_expert_load, moe_layers
from models.parallel import TensorParallel
from models.tp_shard import local_kv_cache_spec, shard_model
from server.engine.grammar import GrammarCompiler
from server.engine.sampler import Sampler, SamplingRow, needs_mask_first, prompt_logprobs, target_probs, token_logprobs
from server.engine.forward_inputs import ForwardInputs, is_decode_like, num_sampled_rows, pack_forward_inputs
from server.engine.step_plan import ScheduledChunk, SchedulerOutput
from server.engine.sequence import Sequence
from server.engine.speculative import accept_greedy, accept_sampled

log = logging.getLogger(__name__)

TokenLogprobs = tuple[float, list[tuple[int, float]]]  # logprob of the chosen token, top-k (id, logprob)


@dataclass(slots=True)
class SampledTokens:
    """What one sequence emits this step: one token, or the accepted drafts and one more."""
    seq: Sequence
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token, only when the request asked for logprobs


@dataclass(slots=True)
class PromptLogprobs:
    seq: Sequence
    start: int                       # prompt position of the first entry (the first token has none)
    entries: list[tuple[int, TokenLogprobs]]  # (target token id, its logprobs) per position


@dataclass(slots=True)
class StepResult:
    sampled: list[SampledTokens]
    prompt_logprobs: list[PromptLogprobs]


class ModelRunner:
    """Owns the model, its paged KV pool and the sampler."""

    def __init__(self, loaded: LoadedModel, num_blocks: int, block_size: int, fast_kernels: bool = True,
                 grammars: GrammarCompiler | None = None, mla_mode: str = "absorbed",
                 tp: TensorParallel | None = None, workers=None, quantization: str | None = None,
                 kv_dtype: torch.dtype | None = None, kernel_backend: str | None = None):
        """tp: this rank's place in a tensor-parallel group (the model is sharded here);
        workers: on rank 0, the WorkerGroup each step's inputs are sent to first;
        quantization: a --quantization method (models/quantization.py), applied to the linears here;
        kv_dtype: the pools' dtype, the model's by default, or int8 (models/kv_int8.py);
        kernel_backend: force one of models/kernels.py's backends (default: this device's)."""
        self.model, self.device, self.block_size = loaded.model, loaded.device, block_size
        self.stop_token_ids = list(loaded.tokenizer.stop_token_ids)
        self.vocab_size = self.model.vocab_parallel.vocab_size or self.model.lm_head.out_features  # V, not a shard
        self.workers = workers
        if tp is not None:
            shard_model(self.model, tp)
        spec = local_kv_cache_spec(self.model.kv_cache_spec, 1 if tp is None else tp.size)
        self.kv_dtype = kv_dtype or loaded.dtype
        self.kv_caches = spec.allocate(num_blocks, block_size, self.kv_dtype, self.device)  # (NB, BS, KVH, W) pools
        self.model.bind_kv_cache(self.kv_caches)
        self.workspace = DecodeWorkspace()
        if quantization is not None or is_quantized(self.model):  # a second engine reuses the model's
            quantize_model(self.model, loaded.name, quantization, use_kernel=fast_kernels, activation_dtype=loaded.dtype)
        is_mla = hasattr(self.model, "set_mla_mode")
        if is_mla:
            self.model.set_mla_mode(mla_mode)  # before packing: the absorbed path splits kv_b_proj's weight
        self.kernels = select_kernels(self.device, fast_kernels, self.kv_dtype, spec.head_dim, kernel_backend, block_size)
        bind_kernels(self.model, self.kernels)  # the one place the device's kernels are chosen
        if is_mla:
            log.info("decode attention: MLA %s (%s)", mla_mode, MLA_PATHS[mla_mode])
        else:
            log.info("decode attention: %s", self.kernels.description)
        self.moe_layers = moe_layers(self.model)
        drain_expert_load(self.moe_layers)  # forget routing counted before this engine (reference forwards)
        self.sampler = Sampler(self.device)
        self.grammars = grammars
        self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self.generators: dict[int, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> StepResult:
        """Run one forward for every chunk, sample the chunks that end at their last token.

        Args:
            output: the scheduler's step; decodes and verification chunks are moved in front.
        Returns:
            Sampled tokens (and prompt logprobs) for the caller to append and check.
        """
        sampling_rows = {id(c): self._sampling_rows(c) for c in output.chunks  # may trim drafts (grammar)
                         if c.samples and c.seq.params.max_tokens != 0}
        chunks = sorted(output.chunks, key=lambda c: not is_decode_like(c))  # stable
        sampling = [c for c in chunks if id(c) in sampling_rows]
        rows = [row for c in sampling for row in sampling_rows[id(c)]]  # one per sampled position
        masks = self._start_grammar_masks(rows, [bool(c.draft_token_ids) for c in sampling for _ in sampling_rows[id(c)]])
        inputs, scorings = pack_forward_inputs(chunks, sampling)
        logits = self._forward(inputs).logits  # (R + prompt rows, V)
        sampled = self._sample(logits[:len(rows)] if rows else None, sampling, rows, masks)
        scored = [self._prompt_logprobs(logits[s.first:s.first + s.num], s.chunk) for s in scorings]
        return StepResult(sampled, scored)

    @torch.inference_mode()
    def forward(self, queries: list[list[int]], seq_lens: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states at the last token of each query (a draft model's step).

        Args:
            queries: new tokens per sequence, ending at position seq_len - 1.
            seq_lens: context length per sequence after these tokens.
            block_tables: where each sequence's K/V live (the target's tables).
        Returns:
            (S, C) in the order given.
        """
        assert self.workers is None, "a draft model runs on rank 0 alone"
        order = sorted(range(len(queries)), key=lambda i: len(queries[i]) != 1)  # decodes first
        input_ids = [t for i in order for t in queries[i]]
        ends = list(accumulate(len(queries[i]) for i in order))
        last = [0] * len(order)  # (S,) packed row of each query's last token, in the order given
        for packed, i in enumerate(order):
            last[i] = ends[packed] - 1
        hidden = self.run_forward(ForwardInputs(input_ids, [len(queries[i]) for i in order], [seq_lens[i] for i in order],
                                                [block_tables[i] for i in order], None, last), with_logits=False)
        return hidden.states[hidden.meta.logit_rows]

    def _forward(self, inputs: ForwardInputs) -> "_Hidden":
        if self.workers is not None:  # tensor parallel: every rank runs this same forward
            self.workers.send(inputs)
        return self.run_forward(inputs)

    @torch.inference_mode()
    def run_forward(self, inputs: ForwardInputs, with_logits: bool = True) -> "_Hidden":
        """The model over one packed batch, and the logits of `inputs.logit_rows` (None on a
        tensor-parallel worker, which only contributes its vocab slice, and without with_logits)."""
        meta = build_attention_metadata(inputs.query_lens, inputs.seq_lens, inputs.block_tables, self.block_size,
                                        self.device, inputs.num_decode_seqs, inputs.input_ids, inputs.logit_rows)
        meta.workspace = self.workspace
        states = self.model(meta.input_ids, meta.positions, meta)  # (N,), (N,) -> (N, C)
        logits = None
        if inputs.logit_rows and with_logits:
            rows = inputs.logit_rows  # every row in order (a decode-only step): no gather
            every_row = len(rows) == states.shape[0] and rows == list(range(len(rows)))
            logits = self.model.compute_logits(states if every_row else states[meta.logit_rows])  # (R, V)
        return _Hidden(states, meta, logits)

    def _start_grammar_masks(self, rows: list[SamplingRow], speculative: list[bool]) -> Future | None:
        """The bitmask of the rows that must be masked before sampling (needs_mask_first, and
        the sampled positions of a verification, whose probabilities are compared), computed by
        llguidance's threads while the forward runs (the matchers already hold every token
        sampled so far); None when no row needs one. Other constrained rows are checked after an
        unmasked draw (Sampler)."""
        matchers = [row.grammar if needs_mask_first(row.params) or (spec and not row.params.greedy) else None
                    for row, spec in zip(rows, speculative)]
        if all(m is None for m in matchers):
            return None
        return self._mask_thread.submit(self.grammars.fill_bitmask, matchers, self.vocab_size)

    def _sample(self, logits: torch.Tensor | None, chunks: list[ScheduledChunk], rows: list[SamplingRow],
                masks: Future | None) -> list[SampledTokens]:
        """logits (R, V): one row per sampled position; a verification chunk has 1 + K of them."""
        if not chunks:
            return []
        bitmask = masks.result() if masks is not None else None  # (R, W)
        out = self.sampler(logits, rows, bitmask, self.grammars, with_logprobs=False)
        drawn = out.token_ids.tolist()
        emitted, first = [], 0
        for chunk in chunks:
            drafts, num = chunk.draft_token_ids, num_sampled_rows(chunk)
            if not drafts:
                tokens = [drawn[first]]
            elif chunk.seq.params.greedy:
                chunk.num_accepted = accept_greedy(drawn[first:first + num], drafts)
                tokens = drafts[:chunk.num_accepted] + [drawn[first + chunk.num_accepted]]
            else:
                window = slice(first, first + num)
                p = target_probs(logits[window], rows[window], None if bitmask is None else bitmask[window])  # (K+1, V)
                chunk.num_accepted, correction = accept_sampled(p, drafts, chunk.draft_probs)
                tokens = drafts[:chunk.num_accepted] + [drawn[first + num - 1] if correction is None else correction]
            emitted.append(tokens)
            first += num
        return self._with_logprobs(logits, chunks, rows, emitted)

    def _with_logprobs(self, logits: torch.Tensor, chunks: list[ScheduledChunk], rows: list[SamplingRow],
                       emitted: list[list[int]]) -> list[SampledTokens]:
        """Logprobs (under the raw logits) of each emitted token, for the requests that asked."""
        if not any(c.seq.params.logprobs is not None for c in chunks):
            return [SampledTokens(c.seq, tokens, None) for c, tokens in zip(chunks, emitted)]
        starts = [0]
        for chunk in chunks:
            starts.append(starts[-1] + num_sampled_rows(chunk))
        at = [starts[i] + j for i, tokens in enumerate(emitted) for j in range(len(tokens))]
        flat = [t for tokens in emitted for t in tokens]
        index = torch.tensor(at, device=logits.device)  # (E,)
        scored = token_logprobs(logits[index], torch.tensor(flat, device=logits.device), [rows[i] for i in at])
        logprobs = scored.logprobs.tolist()
        top_ids, top_lps = scored.top_token_ids.tolist(), scored.top_logprobs.tolist()
        results, e = [], 0
        for chunk, tokens in zip(chunks, emitted):
            k = chunk.seq.params.logprobs
            entries = None
            if k is not None:
                entries = [(logprobs[e + j], list(zip(top_ids[e + j][:k], top_lps[e + j][:k])) if k else [])
                           for j in range(len(tokens))]
            results.append(SampledTokens(chunk.seq, tokens, entries))
            e += len(tokens)
        return results

    def _sampling_rows(self, chunk: ScheduledChunk) -> list[SamplingRow]:
        """The chunk's sampled positions: one row, or 1 + K for a verification, where row i sees
        drafts[:i] as output (its grammar matcher advanced through them)."""
        row = self._sampling_row(chunk.seq)
        if not chunk.draft_token_ids:
            return [row]
        drafts, matcher = chunk.draft_token_ids, row.grammar
        if matcher is not None:  # never verify a draft the grammar forbids
            chunk.keep_drafts(matcher.validate_tokens(drafts))
            drafts = chunk.draft_token_ids
        rows = [row]
        for i in range(1, len(drafts) + 1):
            grammar = None
            if matcher is not None:
                grammar = matcher.deep_copy()
                grammar.consume_tokens(drafts[:i])
            rows.append(SamplingRow(row.params, row.prompt_token_ids, row.output_token_ids + drafts[:i],
                                    row.generator, row.stop_token_ids, grammar))
        return rows

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

    def _prompt_logprobs(self, logits: torch.Tensor, chunk: ScheduledChunk) -> PromptLogprobs:
        """Logprobs of prompt tokens start+1 .. from the logits (T, V) of this chunk's first T rows."""
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        end = start + logits.shape[0]
        targets = torch.tensor(seq.token_ids[start + 1:end + 1], device=self.device)  # (T,)
        k = seq.params.prompt_logprobs
        target_lp, top_ids, top_lps = prompt_logprobs(logits.float(), targets, k)
        top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
        entries = [(t, (lp, list(zip(top_ids[j], top_lps[j]))))
                   for j, (t, lp) in enumerate(zip(targets.tolist(), target_lp.tolist()))]
        return PromptLogprobs(seq, start + 1, entries)

    def drain_expert_load(self) -> list[int] | None:
        """Tokens routed to each expert since the last call, summed over MoE layers; None if dense."""
        load = drain_expert_load(self.moe_layers)  # (L_moe, E)
        return None if load is None else load.sum(0).tolist()

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (its seeded generator) once it finished."""
        self.generators.pop(seq_id, None)


@dataclass(slots=True)
class _Hidden:
    states: torch.Tensor              # (N, C)
    meta: object                      # the step's AttentionMetadata
    logits: torch.Tensor | None       # (R, V) at inputs.logit_rows
