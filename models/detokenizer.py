"""Streaming detokenization: token ids in, complete UTF-8 text out.

One token can end in the middle of a character (byte-level BPE splits emoji and CJK across
tokens), so text cannot be produced token by token with `decode([id])`. Instead each token's
raw bytes go through an incremental UTF-8 decoder, which emits every complete character and
keeps the trailing incomplete bytes until the next token completes them. Bytes that can never
form a character become U+FFFD as soon as that is certain, exactly as `Tokenizer.decode` of
the whole sequence would render them. Each `add` costs O(bytes of one token).
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, one token at a time."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pieces: list[str] = []

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ('' while a character is pending)."""
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        return self._emit(self._utf8.decode(self._tokenizer.token_bytes(token_id)))

    def flush(self) -> str:
        """End of stream: return what is still pending, invalid bytes as U+FFFD."""
        return self._emit(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]  # join lazily so add() stays O(1)
        return self._pieces[0] if self._pieces else ""

    def _emit(self, new_text: str) -> str:
        if new_text:
            self._pieces.append(new_text)
        return new_text
