"""`nanoserve serve` flags, each also read from NANOSERVE_<FLAG> in the environment.

Parsed once into a ServerConfig (HTTP settings) plus an EngineConfig, passed down from there.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from models.builtin import DEFAULT_MODEL
from server.config import EngineConfig


@dataclass
class ServerConfig:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None   # None: the --model string
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    device: str | None = None
    api_key: str | None = None
    max_queue: int = 1024                  # waiting requests before 429
    max_request_bytes: int = 1 << 20       # bodies above this get 413
    log_level: str = "info"
    shutdown_timeout_s: float = 30.0       # SIGTERM: in-flight requests get this long to finish
    engine: EngineConfig = field(default_factory=EngineConfig)
    overrides: dict[str, str] = field(default_factory=dict)  # --override architecture knobs

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def _env(name: str, default):
    return os.environ.get("NANOSERVE_" + name.upper().replace("-", "_"), default)


def _env_bool(name: str, default: bool) -> bool:
    value = _env(name, None)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' or a plain number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lowered = str(text).strip().lower()
    for unit, scale in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * scale)
    return int(float(lowered))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Every serve flag, with its NANOSERVE_<FLAG> environment default."""
    e = EngineConfig()
    p.add_argument("--model", default=_env("model", DEFAULT_MODEL), help="model spec (env NANOSERVE_MODEL)")
    add_override_argument(p, _env("override", None))
    p.add_argument("--served-model-name", default=_env("served_model_name", None), help="name clients use (default: --model)")
    p.add_argument("--host", default=_env("host", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("port", 8000)))
    p.add_argument("--dtype", default=_env("dtype", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=_env("device", None), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=_opt_int(_env("max_model_len", None)), help="default: the checkpoint's context length")
    p.add_argument("--max-num-seqs", type=int, default=int(_env("max_num_seqs", e.max_num_seqs)))
    p.add_argument("--max-num-batched-tokens", type=int, default=int(_env("max_num_batched_tokens", e.max_num_batched_tokens)))
    p.add_argument("--block-size", type=int, default=int(_env("block_size", e.block_size)))
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=parse_bytes(_env("kv_cache_memory", e.kv_cache_memory)), help="bytes for the KV pool, e.g. 2GiB")
    p.add_argument("--num-kv-blocks", type=int, default=_opt_int(_env("num_kv_blocks", None)), help="explicit pool size (overrides --kv-cache-memory)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=_env_bool("enable_prefix_caching", True))
    add_speculative_arguments(p)
    add_mla_argument(p)
    add_tensor_parallel_argument(p)
    add_quantization_argument(p)
    add_kv_cache_dtype_argument(p)
    p.add_argument("--max-queue", type=int, default=int(_env("max_queue", 1024)), help="waiting requests before 429")
    p.add_argument("--max-request-bytes", type=int, default=int(_env("max_request_bytes", 1 << 20)), help="larger bodies get 413")
    p.add_argument("--api-key", default=_env("api_key", None), help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--shutdown-timeout", type=float, default=float(_env("shutdown_timeout", 30)),
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default=_env("log_level", "info"), choices=["debug", "info", "warning", "error"])


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    """Speculative decoding flags (serve and bench)."""
    p.add_argument("--speculative", default=_env("speculative", None), metavar="ngram|draft:SPEC",
                   help="speculative decoding: n-gram prompt lookup, or a draft model with the same tokenizer")
    p.add_argument("--num-speculative-tokens", type=int, default=int(_env("num_speculative_tokens", 4)),
                   help="draft tokens verified per step (K)")
    p.add_argument("--draft-num-layers", type=int, default=_opt_int(_env("draft_num_layers", None)),
                   help="keep only the draft model's first N layers (a layer-truncated copy)")
    p.add_argument("--speculative-max-batch", type=int, default=int(_env("speculative_max_batch", 8)),
                   help="speculate only while at most this many sequences run")
    p.add_argument("--ngram-min", type=int, default=int(_env("ngram_min", 1)),
                   help="n-gram lookup: the shortest suffix that counts as a match")
    p.add_argument("--ngram-max", type=int, default=int(_env("ngram_max", 4)),
                   help="n-gram lookup: the longest suffix looked up")


def add_override_argument(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--override (serve, generate, bench): architecture knobs, parsed into a dict."""
    from models.overrides import parse_overrides

    def knobs(text: str) -> dict[str, str]:
        try:
            return parse_overrides(text)
        except ValueError as error:  # argparse prints an ArgumentTypeError's own sentence
            raise argparse.ArgumentTypeError(str(error)) from None

    p.add_argument("--override", type=knobs, default=parse_overrides(default), metavar="KNOB=VALUE,...",
                   help="random presets: layers, heads, kv_heads, hidden, intermediate, head_dim, rope_theta, vocab, "
                        "tie_embeddings, ... (a checkpoint: layers only)")


def add_mla_argument(p: argparse.ArgumentParser) -> None:
    """--mla-mode (serve and bench): how DeepSeek models' decode attention reads the latent cache."""
    p.add_argument("--mla-mode", choices=["absorbed", "naive"], default=_env("mla_mode", "absorbed"),
                   help="MLA models: attend over the cached latents (absorbed) or re-expand them to K/V every step (naive)")


def add_tensor_parallel_argument(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size (serve and bench): processes that each hold a slice of every weight."""
    p.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=_positive_int(_env("tensor_parallel_size", 1)), metavar="N",
                   help="split every layer over N processes (gloo on CPU, NCCL on GPUs); N must divide the "
                        "attention heads, the MLP width and the experts")


def _one_of(choices: tuple[str, ...]):
    """An argparse `type` that accepts only `choices`. A type, not `choices=`: argparse runs a
    string default (the environment's) through type too, so a bad environment value is refused
    in one sentence as well."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def add_quantization_argument(p: argparse.ArgumentParser) -> None:
    """--quantization (serve and bench): weight-only int8 linears, made at load from any checkpoint."""
    from models.quantization import QUANTIZATION_METHODS

    names = ("none", *QUANTIZATION_METHODS)
    p.add_argument("--quantization", "-q", type=lambda text: None if text in ("", "none") else _one_of(names)(text),
                   default=_env("quantization", "none"), metavar="{" + ",".join(names) + "}",
                   help="weights of every linear layer and the LM head: int8 (one scale per output channel), "
                        "int4[-g64|-g128] (4-bit, a scale and minimum per group of 32/64/128), gguf (a GGUF file's "
                        "Q4_0/Q4_1 tensors as stored); activations keep --dtype")


def add_kv_cache_dtype_argument(p: argparse.ArgumentParser) -> None:
    """--kv-cache-dtype (serve, bench, eval): the KV pool's dtype, the model's or int8."""
    from models.kv_int8 import KV_CACHE_DTYPES

    p.add_argument("--kv-cache-dtype", type=_one_of(KV_CACHE_DTYPES), default=_env("kv_cache_dtype", "auto"),
                   metavar="{" + ",".join(KV_CACHE_DTYPES) + "}",
                   help="auto: the model's dtype; int8: keys and values as int8 with one float32 scale per token "
                        "and head, ~1.9x the tokens of a 16-bit cache in the same --kv-cache-memory")


def speculative_config_from_args(args: argparse.Namespace):
    """A SpeculativeConfig, or None without --speculative. Raises ValueError for bad values."""
    from server.engine.speculative import SpeculativeConfig

    if not args.speculative:
        return None
    return SpeculativeConfig.parse(args.speculative, num_tokens=args.num_speculative_tokens,
                                   draft_num_layers=args.draft_num_layers, max_batch=args.speculative_max_batch,
                                   ngram_min=args.ngram_min, ngram_max=args.ngram_max)


def _positive_int(text) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _opt_int(value) -> int | None:
    return None if value in (None, "") else int(value)


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching, speculative=speculative_config_from_args(args),
        mla_mode=args.mla_mode, tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        dtype=args.dtype, device=args.device, api_key=args.api_key, max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes, log_level=args.log_level,
        shutdown_timeout_s=args.shutdown_timeout, engine=engine, overrides=args.override,
    )
