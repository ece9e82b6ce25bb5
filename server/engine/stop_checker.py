"""StopChecker: cut a streamed, detokenized text at its first stop string.

Text arrives in pieces (one per decode step) and a stop string may span several of them, so the
checker keeps a small `pending` buffer of text it has not released yet. After each piece:

    emitted text | pending
                 |  ...safe...| tail that could still start a stop string
                                (longest suffix that is a proper prefix of some stop string)

- The earliest complete match in `pending` wins, unless some stop string could still start
  before it (a held-back tail that begins earlier): then we wait, because the answer must be the
  text before the EARLIEST match in the whole text, whichever stop string completes first.
  Example: stops ["bc", "abcd"], pieces "ab", "c", "d" -> "" (not "a").
- Everything before the held-back tail is released. The tail is at most max(len(stop)) - 1
  characters, and a streaming client never sees part of a stop string.

The final text is therefore `text[:first_match]` (or all of it), however the text was split.
Before a request's min_tokens are generated, matches are passed over (`can_stop=False`).
"""
from __future__ import annotations


class StopChecker:
    """Incremental stop-string matcher for one sequence."""

    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.text = ""       # all text released so far
        self.stopped = False
        self._pending = ""   # received, not yet released

    def process(self, new_text: str, can_stop: bool = True) -> tuple[str, bool]:
        """Feed newly detokenized text; returns (text safe to emit now, stopped).

        can_stop=False (min_tokens not reached yet): a match is passed over, but a tail that
        could still become a stop string is held back as usual.
        """
        if self.stopped:
            return "", True
        if not self.stop:
            self.text += new_text
            return new_text, False
        self._pending += new_text
        if not can_stop:
            return self._release(self._held_back_start()), False
        match = self._earliest_match()
        hold = self._held_back_start()
        if match is not None and match <= hold:
            self.stopped = True
            return self._release(match), True
        return self._release(hold), False

    def flush(self) -> str:
        """At the end of generation (length / EOS): release what is held back.

        A complete match still waiting on a longer candidate that can no longer finish cuts
        the text here, and marks the checker stopped.
        """
        if self.stopped:
            return ""
        match = self._earliest_match()
        self.stopped = match is not None
        return self._release(len(self._pending) if match is None else match)

    def _release(self, end: int) -> str:
        """Emit pending[:end]; once stopped, the rest (the stop string onwards) is dropped."""
        out, self._pending = self._pending[:end], self._pending[end:]
        if self.stopped:
            self._pending = ""
        self.text += out
        return out

    def _earliest_match(self) -> int | None:
        starts = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        return min(starts, default=None)

    def _held_back_start(self) -> int:
        """Start of the longest suffix of pending that a stop string could still complete."""
        longest = max(len(s) for s in self.stop)
        first = max(0, len(self._pending) - longest + 1)
        for start in range(first, len(self._pending)):
            tail = self._pending[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return start
        return len(self._pending)
