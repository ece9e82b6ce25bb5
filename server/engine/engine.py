"""Engine: requests in, token deltas out, one `step()` at a time.

    step() = schedule -> run -> postprocess

The scheduler picks chunks under the token and sequence budgets, the model runner turns them
into one forward pass and samples, and postprocessing appends tokens, detokenizes, checks stop
conditions and frees finished sequences. With speculative decoding, a proposer fills the
decodes' lookahead slots between schedule and run, and a sequence may emit several tokens in one
step (server/engine/speculative.py). A request with n > 1 fans out into n sequences that
share the prompt's blocks through the prefix cache. Single-threaded: the async layer owns the
thread that calls `step()`.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from models.detokenizer import IncrementalDetokenizer
from models.kv_int8 import pool_dtype
from models.loader import LoadedModel
from models.tp_shard import local_kv_cache_spec
from server.config import EngineConfig
from server.engine.choice_output import ChoiceOutput
from server.engine.grammar import GrammarCompiler
from server.engine.kv_cache import BlockManager
from server.engine.outputs import ChoiceDelta, RequestStats, StepStats, TokenLogprobs, merge_delta
from server.engine.runner import ModelRunner, StepResult
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.step_plan import SchedulerOutput
from server.engine.sequence import FinishReason, Sequence
from server.engine.speculative import (DraftProposer, NgramProposer, after_verification, draft_quantization,
                                      load_draft_model)
from server.engine.stop_checker import StopChecker
from server.engine.tp_workers import start_workers

log = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    arrival_time: float
    choices: list[ChoiceOutput] = field(default_factory=list)
    pending: list[Sequence] = field(default_factory=list)  # choices 1..n-1, queued once the prompt is cached
    first_token_time: float | None = None
    first_scheduled_time: float | None = None


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded, self.config = loaded, config
        self.tokenizer = loaded.tokenizer
        self.built_on_thread = threading.get_ident()  # steps run best on this thread (engine_thread.py)
        max_model_len = min(config.max_model_len or loaded.max_model_len, loaded.max_model_len)
        spec = config.speculative
        draft = load_draft_model(spec, loaded) if spec is not None and spec.method == "draft" else None
        draft_block_bytes = 0 if draft is None else draft.model.kv_cache_spec.bytes_per_block(config.block_size, draft.dtype)
        kv_spec = local_kv_cache_spec(loaded.model.kv_cache_spec, config.tensor_parallel_size)
        kv_dtype = pool_dtype(config.kv_cache_dtype, loaded.dtype)
        num_blocks = config.resolve_num_blocks(kv_spec, kv_dtype, max_model_len, draft_block_bytes)
        if num_blocks * config.block_size < max_model_len:
            log.warning("max_model_len %d lowered to the KV pool's %d tokens", max_model_len,
                        num_blocks * config.block_size)
        self.max_model_len = min(max_model_len, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.max_model_len, spec.num_tokens if spec else 0, spec.max_batch if spec else 0,
                                   free_drafts=spec is not None and spec.method == "ngram")
        self.grammars = GrammarCompiler(self.tokenizer)
        self.workers = start_workers(loaded, config, num_blocks)
        try:
            self.runner = ModelRunner(loaded, num_blocks, config.block_size, config.fast_kernels, self.grammars,
                                      config.mla_mode, self.workers and self.workers.tp, self.workers,
                                      config.quantization, kv_dtype, config.kernel_backend)
            if self.workers is not None:
                self.workers.wait_ready()
        except BaseException:
            self.close()
            raise
        self.proposer = None
        if spec is not None:
            self.proposer = NgramProposer(spec) if draft is None else DraftProposer(
                spec, ModelRunner(draft, num_blocks, config.block_size, config.fast_kernels,
                                  quantization=draft_quantization(config.quantization, spec.draft_model),
                                  kernel_backend=config.kernel_backend), self.runner.vocab_size)
            log.info("speculative decoding: %s, while at most %d sequences run", spec.describe(), spec.max_batch)
        self.stop_token_ids = set(self.tokenizer.stop_token_ids)
        self.requests: dict[str, _Request] = {}
        self._choices: dict[int, ChoiceOutput] = {}  # seq_id -> choice
        self._seq_ids = itertools.count()
        self._aborted: list[ChoiceDelta] = []
        self._retired: list[RequestStats] = []  # stats of requests retired outside step() (aborts)
        self.vocab_size = self.runner.vocab_size
        self._prefix_counts = (0, 0)
        block_bytes = kv_spec.bytes_per_block(config.block_size, kv_dtype) + draft_block_bytes
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB%s%s); %s", num_blocks, config.block_size,
                 num_blocks * config.block_size, num_blocks * block_bytes / 2**30,
                 ", draft model's pool included" * bool(draft), " on each tensor-parallel rank" * bool(self.workers),
                 kv_spec.describe(kv_dtype))

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request of `params.n` choices.

        Args:
            request_id: unique id, used to abort and to label outputs.
            prompt_token_ids: the prompt, at least one token.
            params: sampling and stopping settings.
        Raises:
            RequestRejected: the prompt plus max_tokens can never fit the context or the pool.
            ValueError: empty prompt, duplicate request id, token ids outside the vocabulary,
                an invalid grammar (InvalidGrammar).
        """
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Length first: a prompt of millions of ids is refused before anything scans it (with
        # the GIL held, which would stall every stream).
        self.scheduler.check_admissible(len(prompt_token_ids), params.max_tokens)
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if params.max_tokens is None:
            params.max_tokens = max(self.max_model_len - len(prompt_token_ids), 0)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        request = _Request(request_id, arrival)
        for index in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, prompt_token_ids, params, arrival, index)
            seq.grammar = self.grammars.matcher(params.grammar) if params.grammar is not None else None
            if index == 0 or not self.config.enable_prefix_caching:
                self.scheduler.add(seq)  # every choice passes the same check: all or none queued
            else:
                request.pending.append(seq)
            choice = ChoiceOutput(seq, index, IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
                                  StopChecker(params.stop))
            if params.prompt_logprobs is not None:
                choice.prompt_logprobs = [None] * len(prompt_token_ids)
            request.choices.append(choice)
            self._choices[seq.seq_id] = choice
        self.requests[request_id] = request

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed now and a final "abort" delta comes next step."""
        request = self.requests.get(request_id)
        pending = request.pending if request else []
        for seq in pending:
            self.scheduler.finish(seq, FinishReason.ABORT)
        for seq in self.scheduler.abort(request_id) + pending:
            choice = self._choices[seq.seq_id]
            self._aborted.append(choice.delta([], "", None))
        if request:
            request.pending = []
        if request_id in self.requests and all(c.seq.is_finished for c in self.requests[request_id].choices):
            self._retire(self.requests.pop(request_id), time.monotonic(), None)

    @property
    def failure(self) -> str | None:
        """Why this engine can no longer step (a tensor-parallel worker died), or None."""
        return None if self.workers is None else self.workers.failure

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> tuple[list[ChoiceDelta], StepStats]:
        """Schedule, run one forward pass, postprocess. Returns the deltas and the step's stats."""
        preemptions_before = self.scheduler.num_preemptions
        output = self.scheduler.schedule()
        stats = self._new_stats()
        deltas, self._aborted = self._aborted, []
        stats.finished, self._retired = self._retired, []
        if not output.is_empty:
            now = time.monotonic()
            for chunk in output.chunks:
                request = self.requests[chunk.seq.request_id]
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
            self._propose(output)
            result = self.runner.execute(output)
            deltas += self._postprocess(output, result, stats)
            stats.expert_tokens, stats.num_moe_layers = self.runner.drain_expert_load(), len(self.runner.moe_layers)
            stats.batch_size = len(output.chunks)
            stats.num_batched_tokens = sum(chunk.num_new_tokens for chunk in output.chunks)
        stats.num_preemptions = self.scheduler.num_preemptions - preemptions_before
        stats.num_running, stats.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        stats.kv_cache_usage = self.block_manager.usage
        return deltas, stats

    def _fork_pending_choices(self, output) -> None:
        """n > 1: once the first choice has its prompt in the cache, queue the others first in
        line; they reuse the prompt's full blocks through the prefix cache."""
        for chunk in output.chunks:
            request = self.requests.get(chunk.seq.request_id)
            if request and request.pending and chunk.seq.num_computed_tokens >= chunk.seq.num_prompt_tokens:
                for seq in reversed(request.pending):
                    self.scheduler.add(seq, front=True)
                request.pending = []

    def _propose(self, output: SchedulerOutput) -> None:
        """Fill the lookahead slots the scheduler reserved with draft tokens."""
        speculative = [chunk for chunk in output.chunks if chunk.num_spec_slots]
        if speculative:
            self.proposer.propose(speculative)

    def _postprocess(self, output: SchedulerOutput, result: StepResult, stats: StepStats) -> list[ChoiceDelta]:
        """Append sampled tokens, detokenize, check stops, advance the cache, free what finished."""
        now = time.monotonic()
        for scored in result.prompt_logprobs:
            choice = self._choices[scored.seq.seq_id]
            for offset, (_, entry) in enumerate(scored.entries):
                choice.prompt_logprobs[scored.start + offset] = entry
        outcomes = [self._append_tokens(sampled.seq, sampled.token_ids, sampled.logprobs, now, stats)
                    for sampled in result.sampled]
        self.scheduler.update_after_step(output)  # after the append: accepted drafts are hashed into blocks
        self._fork_pending_choices(output)
        after_verification(output.chunks, stats, self.scheduler.num_speculative_tokens)
        deltas = [self._finish_or_continue(*outcome, now) for outcome in outcomes]
        deltas += self._finish_prompt_only(now)
        for request_id in {d.request_id for d in deltas if d.finished}:
            request = self.requests.get(request_id)
            if request and all(c.seq.is_finished for c in request.choices):
                self._retire(self.requests.pop(request_id), now, stats)
        return deltas

    def _append_tokens(self, seq: Sequence, token_ids: list[int], logprobs: list | None, now: float,
                       stats: StepStats) -> tuple:
        """Append this step's tokens one by one, each checked for a stop; the tokens after a
        stop (accepted drafts past EOS, a stop string or max_tokens) are dropped."""
        choice = self._choices[seq.seq_id]
        assert not seq.is_finished, "aborts are applied between steps, never during one"
        kept, text, reason = choice.append(token_ids, self.stop_token_ids, self.max_model_len)
        stats.num_generation_tokens += kept
        self._record_token_time(seq, now, stats, kept)
        return choice, token_ids[:kept], text, None if logprobs is None else logprobs[:kept], reason

    def _finish_prompt_only(self, now: float) -> list[ChoiceDelta]:
        """max_tokens == 0 (echo scoring, or a 1-token prompt, or no prompt_logprobs at all):
        finish once the whole prompt has been computed; nothing is ever sampled."""
        deltas = []
        for seq in [s for s in self.scheduler.running if s.params.max_tokens == 0]:
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                deltas.append(self._finish_or_continue(self._choices[seq.seq_id], [], "", None, FinishReason.LENGTH, now))
        return deltas

    def _finish_or_continue(self, choice: ChoiceOutput, token_ids: list[int], text: str,
                            logprobs: list[TokenLogprobs] | None, reason: FinishReason | None,
                            now: float) -> ChoiceDelta:
        if reason is not None:
            self.scheduler.finish(choice.seq, reason)
            choice.seq.finished_time = now
            self._release(choice.seq.seq_id)
        return choice.delta(token_ids, text, logprobs)

    # ---- stats --------------------------------------------------------------------------------

    def _new_stats(self) -> StepStats:
        queried, hit = self.block_manager.num_prefix_queried_tokens, self.block_manager.num_prefix_hit_tokens
        stats = StepStats(0, 0, 0.0, num_prefix_queried_tokens=queried - self._prefix_counts[0],
                          num_prefix_hit_tokens=hit - self._prefix_counts[1])
        self._prefix_counts = (queried, hit)
        return stats

    def _release(self, seq_id: int) -> None:
        self.runner.release(seq_id)
        if self.proposer is not None:
            self.proposer.release(seq_id)

    def _record_token_time(self, seq: Sequence, now: float, stats: StepStats, num_tokens: int = 1) -> None:
        """TTFT of the first token; otherwise the time since the last step's tokens, shared
        evenly by the num_tokens this step emits (speculation emits several)."""
        if seq.first_token_time is None:
            seq.first_token_time = now
            request = self.requests[seq.request_id]
            if request.first_token_time is None:
                request.first_token_time = now
                stats.time_to_first_tokens.append(now - request.arrival_time)
                stats.num_prompt_tokens += seq.num_prompt_tokens
        elif seq.last_token_time is not None:
            stats.inter_token_latencies += [(now - seq.last_token_time) / num_tokens] * num_tokens
        seq.last_token_time = now

    def _retire(self, request: _Request, now: float, stats: StepStats | None) -> None:
        """Drop a finished request's state; record its stats."""
        first = request.choices[0].seq
        if request.first_token_time is None and first.finish_reason != FinishReason.ABORT and stats is not None:
            stats.num_prompt_tokens += first.num_prompt_tokens  # prompt-only (max_tokens 0): computed, never sampled
        for choice in request.choices:
            self._choices.pop(choice.seq.seq_id, None)
            self._release(choice.seq.seq_id)
        record = RequestStats(
            finish_reason=first.finish_reason.value,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generation_tokens=sum(c.seq.num_output_tokens for c in request.choices),
            queue_time=(request.first_scheduled_time or now) - request.arrival_time,
            time_to_first_token=None if request.first_token_time is None else request.first_token_time - request.arrival_time,
            e2e_latency=now - request.arrival_time,
        )
        (stats.finished if stats is not None else self._retired).append(record)

    # ---- offline ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[ChoiceDelta]]:
        """Run prompts to completion. Returns, per prompt, one merged delta per choice."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params_list):
            self.add_request(request_id, prompt, _copy(p))
        merged: dict[tuple[str, int], ChoiceDelta] = {}
        while self.has_unfinished():
            deltas, _ = self.step()
            for d in deltas:
                merge_delta(merged, d)
        return [[merged[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, params_list)]


def _copy(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(params, stop=list(params.stop), stop_token_ids=list(params.stop_token_ids))
