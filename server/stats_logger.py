"""A log line every few seconds while the engine is busy: throughput, queues, KV, prefix hits,
speculative decoding's acceptance when it runs, and MoE expert load balance (max/mean tokens
per expert) for MoE models.

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
        self._expert_tokens: list[int] | None = None

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
        if stats.expert_tokens:
            self._expert_tokens = [a + b for a, b in zip(self._expert_tokens or [0] * len(stats.expert_tokens),
                                                         stats.expert_tokens)]
        elapsed = now - self._since
        if elapsed < self.interval_s:
            return
        hit_rate = self._prefix_hits / self._prefix_queried if self._prefix_queried else 0.0
        extra = ""
        if self._spec_drafts:
            extra = (f", speculative acceptance {100 * self._spec_accepted / self._spec_draft_tokens:.1f}% "
                     f"({(self._spec_accepted + self._spec_drafts) / self._spec_drafts:.2f} tokens per verification)")
        if self._expert_tokens and sum(self._expert_tokens):
            load = self._expert_tokens
            extra += (f", expert load max/mean {max(load) * len(load) / sum(load):.2f} "
                      f"({sum(1 for t in load if t == 0)} of {len(load)} experts idle)")
        log.info("prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
                 "KV usage %.1f%%, prefix cache hit rate %.1f%%%s",
                 self._prompt_tokens / elapsed, self._generation_tokens / elapsed,
                 stats.num_running, stats.num_waiting, stats.kv_cache_usage * 100, hit_rate * 100, extra)
        self._reset(now)
