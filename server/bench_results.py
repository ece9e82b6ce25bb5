"""One benchmark run's numbers, shared by `nanoserve bench` and its baselines."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BenchResult:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    elapsed_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    extra: dict = field(default_factory=dict)
