"""ChoiceOutput: what one choice (sequence) has produced as text, and the deltas handed out.

Tokens arrive one step at a time (one, or several when speculative drafts were accepted). Each
token is appended to the sequence, fed to the grammar and the incremental detokenizer, and
checked against the stop conditions in order: stop strings, a finished grammar, stop token ids
(after min_tokens), max_tokens and the context length. Tokens after a stop are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

from models.detokenizer import IncrementalDetokenizer
from server.engine.outputs import ChoiceDelta, TokenLogprobs
from server.engine.sequence import FinishReason, Sequence
from server.engine.stop_checker import StopChecker


@dataclass
class ChoiceOutput:
    seq: Sequence
    index: int
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False

    def append(self, token_ids: list[int], eos_token_ids: set[int], max_model_len: int) -> tuple[int, str, FinishReason | None]:
        """Append this step's tokens until one stops the choice.

        Args:
            token_ids: the step's tokens, in order.
            eos_token_ids: the model's stop ids (ignored under ignore_eos).
            max_model_len: the context limit.
        Returns:
            (tokens kept, the new text, why the choice finished or None).
        """
        seq, text, reason, kept = self.seq, "", None, 0
        for token_id in token_ids:
            seq.append_token(token_id)
            if seq.grammar is not None:
                seq.grammar.consume_token(token_id)
            piece, reason = self._check_stop(token_id, eos_token_ids, max_model_len)
            text, kept = text + piece, kept + 1
            if reason is not None:
                break
        return kept, text, reason

    def _check_stop(self, token_id: int, eos_token_ids: set[int], max_model_len: int) -> tuple[str, FinishReason | None]:
        seq, params = self.seq, self.seq.params
        can_stop = seq.num_output_tokens >= params.min_tokens
        text, stopped = self.stop_checker.process(self.detokenizer.add(token_id), can_stop)
        if stopped:
            return text, FinishReason.STOP
        grammar_done = seq.grammar is not None and (seq.grammar.is_stopped() or seq.grammar.is_error())
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        if grammar_done or (token_id in stop_ids and can_stop):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
            reason = FinishReason.LENGTH
        else:
            return text, None
        tail, stopped = self.stop_checker.process(self.detokenizer.flush())
        return text + tail + ("" if stopped else self.stop_checker.flush()), reason

    def delta(self, token_ids: list[int], text: str, logprobs: list[TokenLogprobs] | None) -> ChoiceDelta:
        """This step's delta; the prompt logprobs ride along once, when the prompt is scored."""
        seq = self.seq
        delta = ChoiceDelta(seq.request_id, self.index, token_ids, text, logprobs,
                            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                            num_cached_tokens=seq.num_cached_tokens)
        prompt_done = seq.num_computed_tokens >= seq.num_prompt_tokens or seq.is_finished
        if self.prompt_logprobs is not None and prompt_done and not self.prompt_logprobs_sent:
            delta.prompt_logprobs, self.prompt_logprobs_sent = self.prompt_logprobs, True
        return delta
