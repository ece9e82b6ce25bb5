"""Engine and server settings: dataclasses parsed once and passed down by construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.base import KVCacheSpec
from models.kernels import BACKENDS
from models.kv_int8 import KV_CACHE_DTYPES
from models.quantization import QUANTIZATION_METHODS

if TYPE_CHECKING:
    from server.engine.speculative import SpeculativeConfig

GiB = 2**30


@dataclass
class EngineConfig:
    max_model_len: int | None = None        # None: the checkpoint's context length
    max_num_seqs: int = 64                   # sequences per step (also the running-set cap)
    max_num_batched_tokens: int = 2048       # tokens per step: decodes + prefill chunks
    block_size: int = 16
    kv_cache_memory: int = 1 * GiB           # bytes for the K/V pool, unless num_kv_blocks is set
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    fast_kernels: bool = True                # oneDNN pre-packed linears (CPU bf16); off = plain F.linear
    speculative: "SpeculativeConfig | None" = None  # speculative decoding: n-gram or a draft model
    mla_mode: str = "absorbed"               # MLA models' decode attention: absorbed | naive (models/mla.py)
    tensor_parallel_size: int = 1            # processes that each hold a slice of every weight
    quantization: str | None = None          # weight-only int8 / int4 / gguf linears (models/quantization.py)
    kv_cache_dtype: str = "auto"             # auto: the model's dtype; int8: rows with a scale each (models/kv_int8.py)
    kernel_backend: str | None = None        # None: this device's (models/kernels.py); reference | cpu | triton

    def __post_init__(self) -> None:
        assert self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1, "budgets must be positive"
        assert self.block_size >= 1 and self.kv_cache_memory > 0
        assert self.num_kv_blocks is None or self.num_kv_blocks >= 1
        assert self.mla_mode in ("absorbed", "naive"), f"unknown MLA mode {self.mla_mode!r}"
        assert self.tensor_parallel_size >= 1, "tensor_parallel_size must be at least 1"
        assert self.quantization in (None, *QUANTIZATION_METHODS), f"unknown quantization {self.quantization!r}"
        assert self.kv_cache_dtype in KV_CACHE_DTYPES, f"unknown KV cache dtype {self.kv_cache_dtype!r}"
        assert self.kernel_backend in (None, *BACKENDS), f"unknown kernel backend {self.kernel_backend!r}"

    def resolve_num_blocks(self, spec: KVCacheSpec, dtype, max_model_len: int, extra_bytes_per_block: int = 0) -> int:
        """Blocks in the pool: explicit, or what the memory budget buys, capped by what
        max_num_seqs full-length sequences could ever use. spec: one rank's share under tensor
        parallelism (the budget is per rank). dtype: the pools' dtype (int8 rows cost D + 4 bytes).
        extra_bytes_per_block: a draft model's pool, which mirrors the target's blocks."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        affordable = self.kv_cache_memory // (spec.bytes_per_block(self.block_size, dtype) + extra_bytes_per_block)
        useful = self.max_num_seqs * -(-max_model_len // self.block_size)
        num_blocks = min(affordable, useful)
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for a single KV block")
        return num_blocks
