"""`--kv-cache-dtype int8`: a KV pool of int8 rows, each carrying its own float32 scale.

One pool row is one token's key (or value) for one KV head: D int8 values, then the 4 bytes of
the float32 scale they were quantized with (symmetric, per token and head), so a row is read
with its scale in one go, the way a GGUF Q8_0 block keeps its scale beside its values:

    pool (NB, BS, KVH, D + 4) int8        row = [ q_0 q_1 ... q_{D-1} | scale as 4 bytes ]
    x_d ~= q_d * scale,   scale = max_d |x_d| / 127,   q_d = round(x_d / scale) in -127..127

A pool of this dtype takes (D + 4) / (2 D) of a bf16 pool's bytes (0.53 at D = 64, 0.52 at
D = 128), so the same memory holds ~1.9x the tokens. Keys and values are quantized as they are
written (`store_rows`, or the C++ `store_kv` on CPU); the fused CPU decode kernel reads the
int8 rows directly and applies the scale in registers, every other reader dequantizes what it
gathered (`dequantize_rows`).
Every reader, prefill and decode alike, sees the same quantized cache, new tokens included,
so greedy output does not depend on batching, chunking or prefix caching.
"""
from __future__ import annotations

import torch

SCALE_BYTES = 4  # the float32 scale at the end of each int8 row
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype


def pool_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KV pools are allocated in for a --kv-cache-dtype choice."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_cache_dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one pool row: D, or D + 4 bytes for an int8 pool."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) floats -> (..., D + 4) int8 rows, each with its float32 scale at the end.

    Written as multiplications by reciprocals, the arithmetic the C++ store (compiled with
    -ffast-math) does, so both write the same bytes."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) * (1.0 / 127)  # (..., 1)
    values = torch.round(xf * scale.reciprocal()).clamp_(-127, 127).to(torch.int8)  # (..., D), half to even
    return torch.cat((values, scale.view(torch.int8)), dim=-1)  # (..., D + 4)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D + 4) int8 rows -> (..., D) values in `dtype`."""
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)  # (..., 1)
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)


def store_rows(pool: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """Write new rows (N, KVH, D) at their slots of a (NB, BS, KVH, W) pool, quantizing for int8.
    On CPU the C++ `store_kv` (models/csrc/paged_decode_attention.cpp) writes the same bytes."""
    if pool.dtype == torch.int8:
        rows = quantize_rows(rows)  # (N, KVH, D + 4)
    pool.view(-1, *pool.shape[2:]).index_copy_(0, slot_mapping, rows)  # (NB*BS, KVH, W)


def read_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows gathered from a pool, as values in `dtype`: dequantized when the pool is int8."""
    return dequantize_rows(rows, dtype) if rows.dtype == torch.int8 else rows
