"""Optional speed feature: a fused CPU kernel for decode attention (models/csrc/*.cpp).

The PyTorch path gathers every decode's blocks into a dense buffer and then runs SDPA, which
moves the KV cache through memory three times; the kernel reads each cached key and value once,
in place, through the block table. It is compiled on first use (models/cpu_kernels.py) and is
tested against the PyTorch path, which stays the fallback.
"""
from __future__ import annotations

import torch

from models.attention import paged_attention
from models.cpu_kernels import load_kernel


def decode_kernel():
    """The compiled module, or None when it cannot be built here."""
    return load_kernel("nanoserve_paged_decode", "paged_decode_attention.cpp")


def describe_decode_path(head_dim: int) -> str:
    """Which code path decode attention takes for this head dim, for the load log."""
    kernel = decode_kernel()
    if kernel is None:
        return "PyTorch gather + SDPA (the fused kernel did not build)"
    return f"fused C++ kernel, {DECODE_PATHS[kernel.path_for(head_dim)]} (head dim {head_dim})"


DECODE_PATHS = {"avx512": "AVX-512 single-pass online softmax", "avx2": "AVX2 single-pass online softmax",
                "portable": "portable three-pass path"}


def fused_decode_attention(q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, path: str = "best") -> torch.Tensor:
    """q (S, H, D) against each sequence's cached keys/values -> (S, H, D). `path` names one of
    the kernel's `paths()` (it falls back to the next where the head dim has none)."""
    k_pool, v_pool = kv_cache
    return decode_kernel().paged_decode_attention(q, k_pool, v_pool, block_tables, seq_lens, scale, path)


def fused_decode_rows(q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta, scale: float) -> torch.Tensor:
    """paged_attention's `decode` on this kernel: q (R, H, D) -> (R, H, D)."""
    return fused_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale)


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache, meta, scale: float) -> torch.Tensor:
    """paged_attention on the C++ kernels. A decode-only step (every token a decode row, the
    batch-1 case) stores its keys and values and attends in one call; other steps store in C++,
    attend their decode rows with the kernel and their prefill chunks with SDPA.
    q (N, H, D), k and v (N, KVH, D) -> (N, H, D)."""
    kernel = decode_kernel()
    if kv_cache is not None and meta.num_decode_tokens == q.shape[0]:
        k_pool, v_pool = kv_cache
        return kernel.store_and_decode(q, k, v, k_pool, v_pool, meta.slot_mapping, meta.decode_block_tables,
                                       meta.decode_seq_lens, scale)
    return paged_attention(q, k, v, kv_cache, meta, scale, decode=fused_decode_rows, store_kernel=kernel)
