"""Structured output: grammars compiled by llguidance, applied as a token bitmask.

Why llguidance (over xgrammar): it has no Python dependencies (one abi3 wheel; xgrammar pulls in
transformers and triton), it compiles JSON schemas, regexes and Lark/GBNF grammars lazily in a
few milliseconds, and it computes a whole batch's masks in parallel in tens of microseconds per
row, without a Python loop over the vocabulary.

    request --GrammarSpec--> GrammarCompiler.compile()   once per distinct spec (LRU cache)
                             GrammarCompiler.matcher()   a cheap copy per sequence
    each step:  fill_bitmask(matchers) -> (S', W) int32, bit j of word w = token 32*w + j
                apply_bitmask(logits)  -> disallowed tokens are -inf
    each token: matcher.consume_token(id); matcher.is_stopped() ends the sequence ("stop")

The compiler is shared by the HTTP side (validation: an invalid spec is a 400 before the
request reaches the engine) and the engine thread, so its cache is guarded by a lock.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from server.engine.sampling_params import GrammarSpec

if TYPE_CHECKING:
    import llguidance

    from models.tokenizer import Tokenizer

SPECIAL_TOKEN_MARKER = b"\xff"  # llguidance spells special tokens as 0xFF + their text
# JSON laid out as json.dumps writes it (", " and ": ", no other whitespace): what models saw most
# in training, and a small model cannot ramble in newlines and indentation.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidGrammar(ValueError):
    """The spec does not compile; the message says why (a 400 for the client)."""


class GrammarCompiler:
    """Compiles GrammarSpecs against one tokenizer; hands out one matcher per sequence."""

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 128):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._executor: llguidance.LLExecutor | None = None

    def compile(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """The compiled grammar of `spec` (cached). Raises InvalidGrammar."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer(), _grammar_text(spec), log_level=0)
        if matcher.is_error():
            raise InvalidGrammar(matcher.get_error().strip())
        with self._lock:
            self._compiled[spec] = matcher
            if len(self._compiled) > self._cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start, for one sequence."""
        return self.compile(spec).deep_copy()

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The vocabulary as llguidance sees it, built on first use (~0.2 s)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = _ll_tokenizer(self._tokenizer)
            return self._ll_tokenizer

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> Tensor:
        """Allowed next tokens of each matcher, computed in parallel: (S', W) int32 on CPU."""
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        num_words = (self.ll_tokenizer().vocab_size + 31) // 32
        bitmask = torch.empty((len(matchers), num_words), dtype=torch.int32)  # (S', W)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                               bitmask.data_ptr(), num_words * 4, len(matchers))
        return bitmask


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """-inf at every token whose bit is 0; tokens past the bitmask (padding ids) too.

    logits (S', V) float, bitmask (S', W) int32; returns a new (S', V) tensor.
    """
    num_rows, vocab_size = logits.shape
    shifts = torch.arange(32, dtype=torch.int32)  # (32,)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (S', W, 32)
    allowed = bits.view(num_rows, -1).bool()  # (S', W * 32)
    if allowed.shape[1] < vocab_size:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))  # (S', V)
    allowed = allowed[:, :vocab_size].to(logits.device)  # (S', V)
    return logits.masked_fill(~allowed, float("-inf"))


def _grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar definition of a spec; raises InvalidGrammar for malformed input."""
    import llguidance

    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.value)
        if spec.kind == "choice":
            choices = json.loads(spec.value)
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        if spec.kind == "grammar":  # Lark, or llama.cpp's GBNF (converted to Lark)
            return llguidance.grammar_from("grammar", spec.value)
    except ValueError as error:
        raise InvalidGrammar(str(error)) from error
    raise InvalidGrammar(f"unknown grammar kind {spec.kind!r}")


def _ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """Wrap our Tokenizer: every id's raw bytes (special tokens marked), EOS ids, encode()."""
    import llguidance

    class _Vocabulary:
        eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        bos_token_id = tokenizer.bos_token_id
        special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        tokens = [SPECIAL_TOKEN_MARKER + tokenizer.token_bytes(i) if tokenizer.is_special(i)
                  else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]

        def __call__(self, text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

    eos = list(tokenizer.stop_token_ids) or None
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary()), eos_token=eos)
