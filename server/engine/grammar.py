"""Structured output: grammars compiled by llguidance, applied as a token bitmask.

Why llguidance (over xgrammar): it has no Python dependencies (one abi3 wheel; xgrammar pulls in
transformers and triton), it compiles JSON schemas, regexes and Lark/GBNF grammars lazily in a
millisecond or so, and it computes a whole batch's masks on its own threads with the GIL
released, without a Python loop over the vocabulary.

    request --GrammarSpec--> GrammarCompiler.compile()   once per distinct spec (LRU cache)
                             GrammarCompiler.matcher()   a cheap copy per sequence
    each step:  fill_bitmask(matchers, V) -> (S, W) int32, bit j of word w = token 32*w + j
                    (the runner calls it on a side thread while the forward runs)
                apply_bitmask(logits, bitmask) -> disallowed tokens are -inf (a table lookup + add)
    each token: matcher.consume_token(id); matcher.is_stopped() ends the sequence ("stop")

The compiler is shared by the HTTP side (validation: an invalid spec is a 400 before the
request reaches the engine) and the engine thread, so its cache is guarded by a lock.
"""
from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from functools import cached_property
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

    @cached_property
    def _grammar_vocab_size(self) -> int:
        """Token ids llguidance knows (the tokenizer's; the model may pad past them)."""
        return self.ll_tokenizer().vocab_size

    def accepts(self, matcher: llguidance.LLMatcher, token_id: int) -> bool:
        """Whether `matcher` allows `token_id` next (no state change; ids past the vocabulary: no)."""
        return token_id < self._grammar_vocab_size and matcher.validate_tokens([token_id]) == 1

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher | None], vocab_size: int) -> Tensor:
        """Allowed next tokens of each row over the model's `vocab_size` ids, computed in
        parallel by llguidance: (S, W) int32 on CPU, bit j of word w = token 32 w + j.

        A row without a matcher allows every id; a constrained row never allows the ids past
        the tokenizer's vocabulary (the rows that pad the embedding to a round size).
        """
        import llguidance

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        grammar_words = (self._grammar_vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), grammar_words), -1, dtype=torch.int32)  # (S, W') all allowed
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), grammar_words * 4, len(matchers))
        num_padding_words = (vocab_size + 31) // 32 - grammar_words
        if num_padding_words > 0:
            free = torch.tensor([m is None for m in matchers]).unsqueeze(1)  # (S, 1)
            padding = free.expand(-1, num_padding_words).to(torch.int32).neg()  # (S, P): -1 free, 0 constrained
            bitmask = torch.cat([bitmask, padding], dim=1)  # (S, W)
        return bitmask


# byte value -> the additive penalty of its 8 tokens, lowest bit first: 0 where the bit is set,
# -inf where not. The bitmask's int32 words are read as little-endian bytes, so byte b of word w
# holds the bits of tokens 32 w + 8 b ... 32 w + 8 b + 7.
assert sys.byteorder == "little"
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8)
_penalty_tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """-inf at every token whose bit is 0.

    logits (S, V) float, bitmask (S, W) int32 with 32 W >= V; returns a new (S, V) tensor. One
    row lookup per byte of the bitmask and one add: no loop over the vocabulary, no per-bit
    shifts, no boolean mask (PyTorch's masked_fill is 5x slower than this on CPU).
    """
    num_rows, vocab_size = logits.shape
    assert bitmask.shape[0] == num_rows and bitmask.shape[1] * 32 >= vocab_size, (bitmask.shape, logits.shape)
    key = (logits.device, logits.dtype)
    if key not in _penalty_tables:
        table = torch.zeros(256, 8, dtype=logits.dtype).masked_fill(~_BYTE_BITS, float("-inf"))
        _penalty_tables[key] = table.to(logits.device)  # (256, 8)
    byte_ids = bitmask.to(logits.device).view(torch.uint8).view(-1).long()  # (S * 4W,)
    penalty = _penalty_tables[key].index_select(0, byte_ids).view(num_rows, -1)  # (S, 32W)
    return logits + penalty[:, :vocab_size]  # (S, V)


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
