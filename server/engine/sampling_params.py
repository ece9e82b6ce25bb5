"""SamplingParams: how one request wants its tokens chosen and when it stops.

Plain data, validated once in `__post_init__`; the HTTP layer converts OpenAI request fields
into this, the sampler turns a batch of these into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MAX_TOP_LOGPROBS = 20

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on the output text: what kind, and its source (hashable: compiled once).

    json_schema: a JSON schema as JSON text; regex: a regular expression; choice: a JSON list of
    strings; grammar: a Lark or GBNF grammar.
    """
    kind: GrammarKind
    value: str


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0          # 0 means greedy (argmax), deterministic
    top_p: float = 1.0                # nucleus: keep the smallest set with mass >= top_p
    top_k: int = -1                   # -1 (or 0) disables
    min_p: float = 0.0                # drop tokens with prob < min_p * max_prob
    presence_penalty: float = 0.0     # OpenAI: subtract once if the token appeared in the output
    frequency_penalty: float = 0.0    # OpenAI: subtract count * penalty
    repetition_penalty: float = 1.0   # CTRL/HF style over prompt + output; 1.0 disables
    seed: int | None = None           # per-request generator: same seed, same tokens, any batch
    max_tokens: int | None = 16       # None: up to the context limit
    min_tokens: int = 0               # EOS and stop ids are masked until this many tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # None: no logprobs; k >= 0: sampled token + top-k
    prompt_logprobs: int | None = None  # None: none; k >= 0: per prompt token (first is None)
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # structured output: only tokens the grammar allows
    speculative: bool = True          # False: never speculate for this request (when the server does)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == 0:
            self.top_k = -1
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k must be -1 (disabled) or >= 1"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
