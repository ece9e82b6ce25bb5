"""Prometheus metrics, fed from the engine's StepStats; names as pinned in DESIGN.md.

Each app owns a private CollectorRegistry (tests build several apps in one process). Every
series carries `model_name`. Bucket boundaries span a fast GPU (sub-millisecond inter-token
latency) and a slow CPU (tens of seconds to the first token of a long prompt).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from server.engine.outputs import RequestStats, StepStats

FINISH_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                        20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                       100000)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
ITERATION_TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
EXPERT_TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """The nanoserve_* series of one served model; `observe_step` is a StepObserver."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._build = Info("nanoserve_build", "Version and model of this server", registry=self.registry)
        self._gauges(model_name)
        self._counters(model_name)
        self._histograms(model_name)

    def _gauges(self, name: str) -> None:
        def gauge(metric: str, doc: str) -> Gauge:
            return Gauge(metric, doc, ["model_name"], registry=self.registry).labels(name)

        self.running = gauge("nanoserve_num_requests_running", "Sequences in the running batch")
        self.waiting = gauge("nanoserve_num_requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("nanoserve_kv_cache_usage_perc", "Fraction (0-1) of KV blocks held by live sequences")

    def _counters(self, name: str) -> None:
        def counter(metric: str, doc: str) -> Counter:
            return Counter(metric, doc, ["model_name"], registry=self.registry).labels(name)

        self.preemptions = counter("nanoserve_num_preemptions", "Sequences preempted (recomputed later)")
        self.prompt_tokens = counter("nanoserve_prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("nanoserve_generation_tokens", "Tokens generated")
        self.prefix_queries = counter("nanoserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("nanoserve_prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.spec_drafts = counter("nanoserve_spec_decode_num_drafts", "Speculative verifications (sequences with draft tokens)")
        self.spec_draft_tokens = counter("nanoserve_spec_decode_num_draft_tokens", "Draft tokens verified")
        self.spec_accepted_tokens = counter("nanoserve_spec_decode_num_accepted_tokens", "Draft tokens the target accepted")
        success = Counter("nanoserve_request_success", "Finished requests by finish reason",
                          ["model_name", "finished_reason"], registry=self.registry)
        self.success = {reason: success.labels(name, reason) for reason in FINISH_REASONS}

    def _histograms(self, name: str) -> None:
        def histogram(metric: str, doc: str, buckets) -> Histogram:
            return Histogram(metric, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(name)

        self.ttft = histogram("nanoserve_time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.itl = histogram("nanoserve_inter_token_latency_seconds", "Time between two tokens of a sequence", ITL_BUCKETS)
        self.e2e = histogram("nanoserve_e2e_request_latency_seconds", "Arrival to finish", REQUEST_TIME_BUCKETS)
        self.queue_time = histogram("nanoserve_request_queue_time_seconds", "Arrival to first scheduled", REQUEST_TIME_BUCKETS)
        self.request_prompt_tokens = histogram("nanoserve_request_prompt_tokens", "Prompt tokens per request", TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("nanoserve_request_generation_tokens", "Generated tokens per request (all choices)", TOKEN_COUNT_BUCKETS)
        self.batch_size = histogram("nanoserve_batch_size", "Sequences per engine step", BATCH_SIZE_BUCKETS)
        self.iteration_tokens = histogram("nanoserve_iteration_tokens", "Tokens per engine step", ITERATION_TOKEN_BUCKETS)
        self.expert_tokens = histogram("nanoserve_moe_expert_tokens",
                                       "Tokens routed to one expert in one engine step (mean over MoE layers), one sample per expert",
                                       EXPERT_TOKEN_BUCKETS)

    def set_build_info(self, version: str, model: str, dtype: str, device: str) -> None:
        self._build.info({"version": version, "model_name": self.model_name, "model": model,
                          "dtype": dtype, "device": device})

    def observe_step(self, stats: StepStats) -> None:
        """Fold one engine step into the series (called from the engine thread)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.prefix_queries.inc(stats.num_prefix_queried_tokens)
        self.prefix_hits.inc(stats.num_prefix_hit_tokens)
        if stats.num_spec_drafts:
            self.spec_drafts.inc(stats.num_spec_drafts)
            self.spec_draft_tokens.inc(stats.num_spec_draft_tokens)
            self.spec_accepted_tokens.inc(stats.num_spec_accepted_tokens)
        if stats.batch_size:
            self.batch_size.observe(stats.batch_size)
            self.iteration_tokens.observe(stats.num_batched_tokens)
        if stats.expert_tokens:
            for tokens in stats.expert_tokens:
                self.expert_tokens.observe(tokens / stats.num_moe_layers)
        for ttft in stats.time_to_first_tokens:
            self.ttft.observe(ttft)
        for itl in stats.inter_token_latencies:
            self.itl.observe(itl)
        for request in stats.finished:
            self._observe_finished(request)

    def _observe_finished(self, request: RequestStats) -> None:
        self.success[request.finish_reason].inc()
        self.e2e.observe(request.e2e_latency)
        self.queue_time.observe(request.queue_time)
        self.request_prompt_tokens.observe(request.num_prompt_tokens)
        self.request_generation_tokens.observe(request.num_generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
