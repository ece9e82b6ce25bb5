"""A log line every few seconds while the engine is busy: throughput, queues, KV, prefix hits,
and speculative decoding's acceptance when it runs.

A StepObserver like Metrics: it accumulates StepStats on the engine thread and logs when the
interval has passed, so an idle server stays quiet.
"""
from __future__ import annotations

import logging
import time

from server.engine.outputs import StepStats

log = logging.getLogger("nanoserve.stats")


class StatsLogger:
    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self._since = self._last_step = now
        self._prompt_tokens = self._generation_tokens = 0
        self._prefix_queried = self._prefix_hits = 0
        self._spec_drafts = self._spec_draft_tokens = self._spec_accepted = 0

    def __call__(self, stats: StepStats) -> None:
        now = time.monotonic()
        if now - self._last_step > self.interval_s:   # busy again after idling: new window
            self._reset(now)
        self._last_step = now
        self._prompt_tokens += stats.num_prompt_tokens
        self._generation_tokens += stats.num_generation_tokens
        self._prefix_queried += stats.num_prefix_queried_tokens
        self._prefix_hits += stats.num_prefix_hit_tokens
        self._spec_drafts += stats.num_spec_drafts
        self._spec_draft_tokens += stats.num_spec_draft_tokens
        self._spec_accepted += stats.num_spec_accepted_tokens
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return
        hit_rate = self._prefix_hits / self._prefix_queried if self._prefix_queried else 0.0
        speculation = ""
        if self._spec_drafts:
            speculation = (f", speculative acceptance {100 * self._spec_accepted / self._spec_draft_tokens:.1f}% "
                           f"({(self._spec_accepted + self._spec_drafts) / self._spec_drafts:.2f} tokens per verification)")
        log.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                 "KV usage %.1f%%, prefix cache hit rate %.1f%%%s",
                 self._prompt_tokens / elapsed, self._generation_tokens / elapsed,
                 stats.num_running, stats.num_waiting, stats.kv_cache_usage * 100, hit_rate * 100, speculation)
        self._reset(now)
