"""Optional speed feature: a fused CPU kernel for decode attention (models/csrc/*.cpp).

The PyTorch path gathers every decode's blocks into a dense buffer and then runs SDPA, which
moves the KV cache through memory three times; the kernel reads each cached key and value once,
in place, through the block table. It is compiled on first use with torch's cpp_extension (a
C++ compiler and ninja are needed; the build is cached under ~/.cache/torch_extensions) and is
tested against the PyTorch path. If the build fails, the PyTorch path is used and a warning
says why.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"
# -ffast-math lets float reductions vectorize (the kernel never relies on inf/NaN); -fopenmp makes
# at::parallel_for use every intra-op thread instead of running serially.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_kernel = None
_tried = False


def decode_kernel():
    """The compiled module, or None when it cannot be built here."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        try:
            from torch.utils.cpp_extension import load

            _kernel = load(name="nanoserve_paged_decode", sources=[str(SOURCE)], extra_cflags=CFLAGS, verbose=False)
        except Exception as e:  # compiler missing, headers missing, ninja missing ...
            log.warning("fused decode attention unavailable, using the PyTorch path: %s", str(e).splitlines()[0][:200])
    return _kernel


def fused_decode_attention(q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (S, H, D) against each sequence's cached keys/values -> (S, H, D)."""
    k_pool, v_pool = kv_cache
    return _kernel.paged_decode_attention(q.contiguous(), k_pool, v_pool, block_tables, seq_lens, scale)
