"""Linear layers over quantized weights: int8 per output channel, 4-bit per group of K.

    Int8Linear   q int8, one fp32 scale s per output channel:          W[n, k] = s[n] q[n, k]
    Int8GroupLinear  q int8, an fp16 scale d per group of G along K:   W[n, k] = d[n, g] q[n, k]
                 (GGUF's Q8_0 at G = 32)
    Int4Linear   v in 0..15, a scale d and a minimum m per group of G:  W[n, k] = d[n, g] v[n, k] + m[n, g]
                 (g = k // G; GGUF's Q4_1, and Q4_0 with m = -8 d)

Each runs two paths over the same storage: a C++ kernel for bf16 activations on CPUs with
AVX512-BF16 (models/csrc/int8_linear.cpp, int4_linear.cpp), which reads the quantized bytes and
widens them in registers, and a PyTorch reference everywhere else (fp32 models, GPUs), which
dequantizes the whole weight on every call. On x86 CPUs without AVX512-BF16 (AVX2-only ones,
and AVX-512 ones without BF16 such as Skylake to Ice Lake) every layer has a plain AVX2 + FMA
kernel too: models/csrc/int8_avx2_linear.cpp (per-channel int8) and grouped_avx2_linear.cpp
(4-bit and grouped int8, + F16C for the fp16 scales). Every kernel takes bf16 activations:
a float32 model (`--dtype auto` on those CPUs) runs the reference path, as the load log says. The weights are stored in the kernels'
layout: 64-column blocks of k-pairs (N padded to 64), the layout of the bf16 AVX512-BF16 kernel.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cpu_kernels import load_kernel
from models.fast_linear import PAIRS64_LAYOUT

_GELU_TANH = 1  # activation code of the kernels
COLS = PAIRS64_LAYOUT.cols  # 64 columns a block


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (frozen), not buffers: they are the layer's weights wherever weights are counted.
    return nn.Parameter(t.contiguous(), requires_grad=False)


class QuantizedLinear(nn.Module, ABC):
    """A Linear's kernel (models/layers.py); subclasses store the weight and provide both paths."""

    kernel: Callable | None

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach().float())  # (N,) fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, gelu_tanh=False)

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(linear(x), approximate="tanh"), applied before rounding where the kernel runs."""
        return self._linear(x, gelu_tanh=True)

    def forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """linear(x) as float32 (an LM head's logits): the kernel's sums not rounded to bf16, or
        the reference in float32."""
        if x.dim() != 2:
            return self.forward_float32(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        if self.kernel is not None and x.dtype == torch.bfloat16:
            return self._run_kernel(x, 0, float_output=True)
        return self.reference_float32(x)

    def reference_float32(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) float32 from the dequantized weight."""
        return F.linear(x.float(), self.dequantize(), self.bias)

    def _linear(self, x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
        if x.dim() != 2:  # the engine's activations are (M, K) already: no reshapes on its path
            y = self._linear(x.reshape(-1, self.in_features), gelu_tanh)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.kernel is not None and x.dtype == torch.bfloat16:
            return self._run_kernel(x, _GELU_TANH if gelu_tanh else 0)
        y = self.reference(x)
        return F.gelu(y, approximate="tanh") if gelu_tanh else y

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in PyTorch from the dequantized weight."""
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @abstractmethod
    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or its rows `rows`) in fp32: (N or T, K)."""

    @abstractmethod
    def _run_kernel(self, rows: torch.Tensor, activation: int, float_output: bool = False) -> torch.Tensor:
        """The C++ kernel on bf16 rows (M, K) -> (M, N), bf16 (float32 with float_output), the
        activation code fused. Implementations read their tensors from `self._parameters`: a
        Module attribute lookup of a parameter costs about a microsecond, and a batch-1 step of a
        30-layer model makes ~500 of them."""


class QuantizedEmbedding(nn.Module):
    """Token embedding read out of a tied, quantized LM head: row n is the head's row n."""

    def __init__(self, head: QuantizedLinear, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._owner = (head,)  # keeps the head's weights alive without registering them twice
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._owner[0].dequantize(ids.reshape(-1)).to(self.dtype)  # (T, C)
        return rows.reshape(*ids.shape, self.embedding_dim)


# ---- int8 -------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (N, K) float -> q (N, K) int8, scale (N,) fp32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,); an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_kernel() -> Callable | None:
    """The compiled int8 kernel for this CPU (AVX512-BF16, else AVX2 + FMA), or None where none runs."""
    module = load_kernel("nanoserve_int8_linear", "int8_linear.cpp")
    if module is not None and module.int8_linear_available():
        return module.int8_linear
    return int8_avx2_kernel()


def int8_avx2_kernel() -> Callable | None:
    """The AVX2 + FMA int8 kernel (it builds on AVX-512 CPUs too, where the tests run it directly)."""
    module = load_kernel("nanoserve_int8_avx2_linear", "int8_avx2_linear.cpp")
    return module.int8_avx2_linear if module is not None and module.int8_avx2_available() else None


_KERNEL_CPU = {"int8_avx2_linear": "AVX2", "int8_group_avx2_linear": "AVX2", "int4_avx2_linear": "AVX2"}  # kernel function -> the CPU feature it needs (else AVX512-BF16)


def int8_uses_amx(layer: QuantizedLinear) -> bool:
    """Whether the per-channel int8 kernel multiplies this layer with AMX tiles (K a multiple of 32)."""
    if layer.kernel is None or layer.kernel.__name__ != "int8_linear" or layer.in_features % 32:
        return False
    module = load_kernel("nanoserve_int8_linear", "int8_linear.cpp")  # loaded already: it is the layer's kernel
    return module is not None and module.int8_amx()


def _kernel_cpu(layer: QuantizedLinear) -> str:
    """The CPU feature a layer's kernel runs on: AMX, AVX512-BF16 or AVX2."""
    return "AMX" if int8_uses_amx(layer) else _KERNEL_CPU.get(layer.kernel.__name__, "AVX512-BF16")


def describe_paths(layers: list[QuantizedLinear], activation_dtype: torch.dtype = torch.bfloat16) -> str:
    """Which path the layers take, for the load log: '47 on the AVX2 kernel, 2 on the PyTorch reference path'.
    The kernels take bf16 activations only: with others every layer runs the reference path."""
    kernels = sorted({_kernel_cpu(m) for m in layers if m.kernel is not None})
    if kernels and activation_dtype != torch.bfloat16:
        return (f"{len(layers)} on the PyTorch reference path ({str(activation_dtype).removeprefix('torch.')} "
                f"activations; the {'/'.join(kernels)} kernel takes bfloat16: --dtype bfloat16)")
    paths = Counter("the PyTorch reference path" if m.kernel is None else f"the {_kernel_cpu(m)} kernel" for m in layers)
    return ", ".join(f"{count} on {path}" for path, count in paths.items()) or "none"


class Int8Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear, use_kernel: bool = True):
        super().__init__(linear)
        if self.in_features % 2:
            raise ValueError(f"int8 layers pair their input features; {self.in_features} is odd")
        q, scale = quantize_int8(linear.weight)
        self.qweight = _frozen(PAIRS64_LAYOUT.order(q))  # (ceil(N/64) 64 K,) int8
        self.scale = _frozen(scale)                        # (N,) fp32
        on_cpu = linear.weight.device.type == "cpu"
        self.kernel = int8_kernel() if use_kernel and on_cpu else None

    def int8_weight(self) -> torch.Tensor:
        """q as (N, K) int8, out of the blocked layout (a copy)."""
        return unblock_int8(self.qweight, self.out_features, self.in_features)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        if rows is None:
            return self.int8_weight().float() * self.scale[:, None]
        q = PAIRS64_LAYOUT.rows(self.qweight, rows, self.in_features)  # (T, K) int8
        return q.float() * self.scale[rows, None]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """q widened to x's dtype (exact), one matmul, then the scale in fp32. fp16 scales the
        weight first: unscaled sums (~127 / max|w| times the output) would overflow its range."""
        if x.dtype == torch.float16:
            return super().reference(x)
        y = F.linear(x, self.int8_weight().to(x.dtype)).float() * self.scale  # (M, N)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def reference_float32(self, x: torch.Tensor) -> torch.Tensor:
        """q widened to float32 (one 4-byte copy, no scaled second one), one matmul, then the scale."""
        y = F.linear(x.float(), self.int8_weight().float()) * self.scale  # (M, N)
        return y if self.bias is None else y + self.bias

    def _run_kernel(self, rows: torch.Tensor, activation: int, float_output: bool = False) -> torch.Tensor:
        p = self._parameters
        return self.kernel(rows, p["qweight"], p["scale"], p.get("bias"), self.out_features, activation, float_output)


def unblock_int8(qweight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """PAIRS64_LAYOUT's int8 blocks back to (N, K) (a copy)."""
    blocked = qweight.view(-1, k // 2, COLS, 2)  # [n/64][k/2][n%64][k%2]
    return blocked.permute(0, 2, 1, 3).reshape(-1, k)[:n]


def int8_group_kernel() -> Callable | None:
    """The compiled grouped-int8 kernel for this CPU (AVX512-BF16, else AVX2 + FMA + F16C), or None."""
    module = load_kernel("nanoserve_int8_linear", "int8_linear.cpp")
    if module is not None and module.int8_linear_available():
        return module.int8_group_linear
    return int8_group_avx2_kernel()


def _grouped_avx2_module():
    module = load_kernel("nanoserve_grouped_avx2_linear", "grouped_avx2_linear.cpp")
    return module if module is not None and module.grouped_avx2_available() else None


def int8_group_avx2_kernel() -> Callable | None:
    """The AVX2 grouped-int8 (Q8_0) kernel; it builds on AVX-512 CPUs too, where the tests call it."""
    module = _grouped_avx2_module()
    return None if module is None else module.int8_group_avx2_linear


def int4_avx2_kernel() -> Callable | None:
    """The AVX2 4-bit kernel; it builds on AVX-512 CPUs too, where the tests call it."""
    module = _grouped_avx2_module()
    return None if module is None else module.int4_avx2_linear


class Int8GroupLinear(QuantizedLinear):
    """int8 values with an fp16 scale per group of K, as a GGUF file stores Q8_0 (no quantizer
    here: `parts` are the file's)."""

    def __init__(self, linear: nn.Linear, group_size: int, parts: tuple[torch.Tensor, torch.Tensor],
                 use_kernel: bool = True):
        """parts: q (N, K) int8 and scale (N, K/G) fp16."""
        super().__init__(linear)
        if self.in_features % group_size or group_size % 2:
            raise ValueError(f"{self.in_features} input features do not split into even groups of {group_size}")
        self.group_size = group_size
        q, scale = parts
        n, k = self.out_features, self.in_features
        assert q.shape == (n, k) and q.dtype == torch.int8, (q.shape, q.dtype)
        assert scale.shape == (n, k // group_size) and scale.dtype == torch.float16, (scale.shape, scale.dtype)
        self.qweight = _frozen(PAIRS64_LAYOUT.order(q))  # (ceil(N/64) 64 K,) int8
        self.scale = _frozen(to_blocks(scale))             # (ceil(N/64), groups, 64) fp16
        on_cpu = linear.weight.device.type == "cpu"
        self.kernel = int8_group_kernel() if use_kernel and on_cpu else None

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        if rows is None:
            q, scale = unblock_int8(self.qweight, n, k), from_blocks(self.scale, n)  # (N, K), (N, groups)
        else:  # (T, K), (T, groups): only the rows asked for (an embedding lookup)
            q, scale = PAIRS64_LAYOUT.rows(self.qweight, rows, k), self.scale[rows // COLS, :, rows % COLS]
        return (q.float().view(q.shape[0], k // g, g) * scale.float()[..., None]).view(-1, k)

    def _run_kernel(self, rows: torch.Tensor, activation: int, float_output: bool = False) -> torch.Tensor:
        p = self._parameters
        return self.kernel(rows, p["qweight"], p["scale"], p.get("bias"), self.out_features, self.group_size, activation,
                           float_output)


# ---- 4-bit, group-wise ------------------------------------------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group of `group_size` along K (min/max, as Q4_1), with fp16 scale
    and minimum: (N, K) float -> v (N, K) uint8 in 0..15, scale (N, K/G) fp16, minimum (N, K/G) fp16."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // group_size, group_size)  # (N, groups, G)
    low, high = w.amin(dim=-1), w.amax(dim=-1)                        # (N, groups)
    scale, low = ((high - low) / 15).half(), low.half()               # rounded first: v is chosen for them
    v = torch.round((w - low.float()[..., None]) / scale.float().clamp(min=1e-12)[..., None]).clamp(0, 15)
    return v.to(torch.uint8).view(n, k), scale, low


def pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    """v (N, K) in 0..15 -> the kernel's bytes (ceil(N/64) 64 K / 2,): per block and k-pair, 32
    little-endian words whose nibble j (bits 4j..4j+3) is column 16 j + word / 2, k = 2p + word % 2."""
    n, k = v.shape
    padded = F.pad(v.to(torch.int32), (0, 0, 0, -(-n // COLS) * COLS - n))
    t = padded.view(-1, 4, 16, k // 2, 2).permute(0, 3, 2, 4, 1)  # [n/64][p][c][k%2][j], column 16 j + c
    words = t[..., 0] | t[..., 1] << 4 | t[..., 2] << 8 | t[..., 3] << 12  # (NB, P, 16, 2)
    return words.to(torch.int16).flatten().view(torch.uint8)  # int32 -> int16 keeps the low 16 bits


def unpack_nibbles(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """pack_nibbles' inverse: (N, K) uint8, or only rows `rows` (T,) -> (T, K)."""
    words = packed.view(torch.int16).view(-1, k // 2, 16, 2)  # [n/64][p][c][k%2]
    if rows is not None:  # row n: block n // 64, word column n % 16, nibble (n % 64) // 16
        picked = words[rows // COLS, :, rows % 16, :].to(torch.int32) & 0xFFFF  # (T, P, 2)
        shift = (4 * ((rows % COLS) // 16))[:, None, None]
        return ((picked >> shift) & 15).reshape(-1, k).to(torch.uint8)
    words = words.to(torch.int32) & 0xFFFF
    nibbles = torch.stack([(words >> (4 * j)) & 15 for j in range(4)], dim=1)  # [n/64][j][p][c][k%2]
    return nibbles.permute(0, 1, 3, 2, 4).reshape(-1, k)[:n].to(torch.uint8)  # rows 64 b + 16 j + c


def to_blocks(per_group: torch.Tensor) -> torch.Tensor:
    """(N, groups) -> (ceil(N/64), groups, 64), padded with zeros: what the kernel reads."""
    n, groups = per_group.shape
    padded = F.pad(per_group, (0, 0, 0, -(-n // COLS) * COLS - n))
    return padded.view(-1, COLS, groups).transpose(1, 2).contiguous()


def from_blocks(blocked: torch.Tensor, n: int) -> torch.Tensor:
    return blocked.transpose(1, 2).reshape(-1, blocked.shape[1])[:n]  # (N, groups)


def int4_kernel() -> Callable | None:
    """The compiled 4-bit kernel for this CPU (AVX512-BF16, else AVX2 + FMA + F16C), or None."""
    module = load_kernel("nanoserve_int4_linear", "int4_linear.cpp")
    if module is not None and module.int4_linear_available():
        return module.int4_linear
    return int4_avx2_kernel()


class Int4Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear, group_size: int = 32, use_kernel: bool = True,
                 parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        """parts: (v, scale, minimum) already quantized (a GGUF file's); else `linear` is quantized."""
        super().__init__(linear)
        if self.in_features % group_size:
            raise ValueError(f"{self.in_features} input features do not split into groups of {group_size}")
        self.group_size = group_size
        v, scale, minimum = parts if parts is not None else quantize_int4(linear.weight, group_size)
        self.nibbles = _frozen(pack_nibbles(v))             # (ceil(N/64) 64 K / 2,) uint8
        self.scale = _frozen(to_blocks(scale))              # (ceil(N/64), groups, 64) fp16
        self.minimum = _frozen(to_blocks(minimum))          # (ceil(N/64), groups, 64) fp16
        on_cpu = linear.weight.device.type == "cpu"
        self.kernel = int4_kernel() if use_kernel and on_cpu and group_size % 32 == 0 else None

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        v = unpack_nibbles(self.nibbles, n, k, rows).float()  # (N or T, K): only the rows asked for
        if rows is None:
            scale, minimum = from_blocks(self.scale, n).float(), from_blocks(self.minimum, n).float()  # (N, groups)
        else:  # (T, groups), without unblocking the whole table (an embedding lookup reads a few rows)
            scale = self.scale[rows // COLS, :, rows % COLS].float()
            minimum = self.minimum[rows // COLS, :, rows % COLS].float()
        return (v.view(v.shape[0], k // g, g) * scale[..., None] + minimum[..., None]).view(-1, k)

    def _run_kernel(self, rows: torch.Tensor, activation: int, float_output: bool = False) -> torch.Tensor:
        p = self._parameters
        return self.kernel(rows, p["nibbles"], p["scale"], p["minimum"], p.get("bias"), self.out_features,
                           self.group_size, activation, float_output)
