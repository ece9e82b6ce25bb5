"""The kernel seam: the device-dependent ops a model calls, and which implementation runs each.

Model files call `Linear`, `RMSNorm`, `PagedAttention` (KV store + attention) and the step's
rotary tables (`rope(x)`) the same way on every device. The engine picks one `Kernels` at load (`select_kernels`, in the
model runner) and `bind_kernels` hands the choice to those layers; nothing is swapped out of the
model afterwards, so the model a learner reads in models/gpt2.py is the model that runs.

    op          reference (any device)   cpu (fast kernels)                    triton (CUDA)
    linear      F.linear                 oneDNN-packed bf16, AMX / AVX512-BF16  F.linear (cuBLAS)
                                         small-batch kernels; AVX2 bf16 kernel
                                         where oneDNN has no bf16 (fast_linear.py)
    KV store    index_copy (int8 rows:   C++ store_kv (copy or int8 rows)       Triton store_kv
                kv_int8.py)
    attention   gather + SDPA decode,    fused C++ decode kernel (one call      one Triton kernel for
                SDPA per prefill chunk   with the store for a decode-only       the whole mixed batch
                                         step), SDPA prefill chunks
    RMSNorm     float32 composition      C++ kernel (rms_norm.cpp)              reference
    rotary      float32 composition      C++ kernel (elementwise.cpp)           reference

SwiGLU's SiLU-and-multiply is not part of the seam: `GatedMLP.forward` runs ATen's on every
device (a C++ kernel, not bit-equal to ATen's Sleef exp, moved a greedy answer; elementwise.cpp).

Weight-only quantization (--quantization) hands linears to models/quantized_linear.py before
this binding, on every device (its C++ kernels run on CPU, its PyTorch path elsewhere). An int8
KV cache on CUDA attends through the reference (the Triton kernels read 16/32-bit pools). MLA
(models/mla.py) has its own attention over latents in PyTorch on every device.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import partial
from collections.abc import Callable

import torch
import torch.nn as nn

from models.attention import PagedAttention, paged_attention
from models.fast_linear import pack_linear_layers
from models.fused_attention import cpu_paged_attention, decode_kernel, describe_decode_path
from models.layers import RMSNorm, RotaryEmbedding, apply_rotary, elementwise_kernel, rms_norm_kernel, rms_norm_reference

BACKENDS = ("reference", "cpu", "triton")


@dataclass(frozen=True)
class Kernels:
    """One device's implementations of the seam's ops."""
    name: str                  # one of BACKENDS
    attention: Callable        # paged_attention's signature: (q, k, v, kv_cache, meta, scale) -> (N, H, D)
    rms_norm: Callable         # (x, weight, eps) -> x's shape and dtype
    rotary: Callable           # (x (N, heads, D), cos, signed_sin) -> rotated x
    pack_linears: bool         # hand bf16 linears to packed kernels: oneDNN's or the AVX2 one (CPU only)
    description: str           # what attention runs, for the load log


def select_kernels(device: torch.device, fast_kernels: bool, kv_dtype: torch.dtype, head_dim: int,
                   backend: str | None = None, block_size: int = 16) -> Kernels:
    """The kernels this device runs: `backend` when given (tests run "triton" on CPU tensors
    under TRITON_INTERPRET=1), else reference without fast kernels, cpu on a CPU, triton on CUDA."""
    if backend is None:
        backend = "reference" if not fast_kernels else "cpu" if device.type == "cpu" else "triton"
    assert backend in BACKENDS, f"unknown kernel backend {backend!r}"
    if backend == "cpu":
        assert device.type == "cpu", f"the cpu kernels run on CPU tensors, not {device.type}"
        return _cpu_kernels(head_dim)
    why = "fast kernels off"
    if backend == "triton":
        why = triton_unsupported(kv_dtype, block_size)
        if why is None:
            return Kernels("triton", triton_paged_attention, rms_norm_reference, apply_rotary, False,
                           "one Triton kernel for the mixed batch (models/triton_attention.py)")
    return Kernels("reference", paged_attention, rms_norm_reference, apply_rotary, False, f"PyTorch gather + SDPA ({why})")


def triton_unsupported(kv_dtype: torch.dtype, block_size: int) -> str | None:
    """Why the Triton kernels cannot serve this cache (None: they can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install nanoserve[gpu])"
    if kv_dtype == torch.int8:
        return "int8 KV cache: the Triton kernels read 16/32-bit pools"
    if block_size < 16 or block_size & (block_size - 1):
        return f"block size {block_size}: the Triton kernel tiles pages of a power of two >= 16 keys"
    return None


def bind_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Hand the choice to the model's layers (and pack its linears where the backend does). Like
    the KV pools, the binding lives on the model: of two engines over one model, the last built wins."""
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.attend = kernels.attention
        elif isinstance(module, RMSNorm):
            module.norm = kernels.rms_norm
        elif isinstance(module, RotaryEmbedding):
            module.rotate = kernels.rotary
    if kernels.pack_linears:
        pack_linear_layers(model)


def _cpu_kernels(head_dim: int) -> Kernels:
    """The C++ kernels of models/csrc where they built; each missing one falls back alone."""
    module = decode_kernel()
    attention = paged_attention if module is None else cpu_paged_attention
    norm = rms_norm_kernel()
    rms_norm = rms_norm_reference if norm is None else partial(_rms_norm_cpu, norm.rms_norm)
    elementwise = elementwise_kernel()
    rotary = apply_rotary if elementwise is None else partial(_rotary_cpu, elementwise.rotary)
    return Kernels("cpu", attention, rms_norm, rotary, True, describe_decode_path(head_dim))


def _rms_norm_cpu(kernel: Callable, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The C++ RMSNorm when x has the weight's dtype (one op instead of eight, same math)."""
    return kernel(x, weight, eps) if x.dtype == weight.dtype else rms_norm_reference(x, weight, eps)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the elementwise kernels compute in float32


def _rotary_cpu(kernel: Callable, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """The C++ rotary for (N, heads, D) rows of unit stride: one op instead of six, and the same
    bits as ATen's vectorized composition (models/csrc/elementwise.cpp)."""
    if x.dim() == 3 and x.stride(-1) == 1 and x.dtype in _KERNEL_DTYPES and cos.dtype == torch.float32 \
            and cos.is_contiguous() and signed_sin.is_contiguous():
        return kernel(x, cos, signed_sin)
    return apply_rotary(x, cos, signed_sin)


def triton_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache, meta, scale: float) -> torch.Tensor:
    """paged_attention on the Triton kernels: store the new K/V, then one launch attends every
    query of the batch (prefill chunks over their cached prefix, decodes, verification rows)."""
    from models.triton_attention import store_kv, unified_attention

    if kv_cache is None:  # the cache-free reference forward (no pool to read through)
        return paged_attention(q, k, v, kv_cache, meta, scale)
    k_pool, v_pool = kv_cache
    store_kv(k, v, k_pool, v_pool, meta.slot_mapping)
    return unified_attention(q, k_pool, v_pool, meta.block_tables, meta.query_start_loc_t, meta.seq_lens_t, scale)
