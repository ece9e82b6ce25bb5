"""Layers shared by the model families: linear and embedding layers whose kernel the load picks,
RMSNorm, rotary position embedding, gated MLP, the pre-norm decoder block. Where the load binds a
kernel (RMSNorm's `norm`, the rotary's `rotate`), the default is the PyTorch composition written
here, which the kernels are tested against.

Legend: N tokens in the packed batch, C channels, H heads, D head dim.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cpu_kernels import load_kernel
from models.parallel import AllReduce


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose matmul the load may hand to a
    kernel module that keeps the weight in its own format: oneDNN-packed bf16, int8 or int4
    (models/kernels.py picks, once). The layer stays where the model put it; only `kernel` is set
    and the dense weight released, so the model a learner reads is the model that runs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.kernel: nn.Module | None = None
        self._run_kernel = None  # kernel.forward, a plain attribute: the hot path skips two module lookups
        self._run_kernel_gelu_tanh = None  # kernel.forward_gelu_tanh where the kernel fuses it
        self._run_kernel_float32 = None  # kernel.forward_float32 where the kernel writes float32 (LMHead)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run_kernel is None:
            return F.linear(x, self.weight, self.bias)
        return self._run_kernel(x)

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(linear(x), approximate="tanh"), fused into the matmul where the kernel can."""
        fused = self._run_kernel_gelu_tanh
        return fused(x) if fused is not None else F.gelu(self(x), approximate="tanh")

    def use_kernel(self, kernel: nn.Module) -> None:
        """Run through `kernel` from now on; it copied the weight (and holds the bias) already."""
        self.kernel, self._run_kernel = kernel, kernel.forward
        self._run_kernel_gelu_tanh = getattr(kernel, "forward_gelu_tanh", None)
        self._run_kernel_float32 = getattr(kernel, "forward_float32", None)
        self.weight = None  # freed once nothing else (a tied embedding) holds it
        self.bias = None


class LMHead(Linear):
    """The LM head: a Linear whose logits come out in float32. bf16 keeps 8 bits of mantissa,
    so logits between 16 and 32 sit 0.125 apart: close candidates would tie and greedy would
    pick the lower id. A module of its own, so forward hooks (`nanoserve trace`) see the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (M, V) float32: the kernel's float32 sums, never rounded to bf16, where it can
        write them; else the output widened (the reference path, CUDA)."""
        unrounded = self._run_kernel_float32
        return unrounded(x) if unrounded is not None else super().forward(x).float()


class Embedding(nn.Embedding):
    """nn.Embedding whose rows may be read out of a tied LM head's kernel instead (one copy of
    the table, in the head's packed or quantized format)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.kernel: nn.Module | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) if self.kernel is None else self.kernel(ids)

    def use_kernel(self, kernel: nn.Module) -> None:
        """Read rows through `kernel` (a tied head's) from now on; the own table is released."""
        self.kernel = kernel
        self.weight = None


def dense_layers(model: nn.Module, kind: type = Linear) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every `kind` layer that still runs its own dense weight (no kernel yet)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and m.kernel is None]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The PyTorch composition: float32 math, rounded to x's dtype before the weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as HF Llama/Qwen do). Which
    implementation runs is the load's choice (models/kernels.py binds `norm`)."""

    norm: Callable = staticmethod(rms_norm_reference)  # (x, weight, eps) -> x's shape and dtype

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps)


def rms_norm_kernel():
    """models/csrc/rms_norm.cpp, or None where it cannot be built (the reference path runs)."""
    return load_kernel("nanoserve_rms_norm", "rms_norm.cpp")


def elementwise_kernel():
    """models/csrc/elementwise.cpp (the rotary), or None where it cannot be built."""
    return load_kernel("nanoserve_elementwise", "elementwise.cpp")


class GatedMLP(nn.Module):
    """SwiGLU MLP with the gate and up projections fused into one matmul. The activation is ATen's
    on every backend: a C++ SiLU-and-multiply rounded differently from ATen's `silu` and moved the
    default model's first greedy token (README, "The ops between the matmuls")."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = Linear(dim, 2 * hidden_dim, bias=bias)  # [gate; up]
        self.down_proj = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (N, C) -> 2 x (N, F)
        return self.down_proj(F.silu(gate) * up)  # (N, F) -> (N, C)


class PreNormBlock(nn.Module):
    """The Llama / Qwen / DeepSeek decoder layer: x + attn(RMSNorm(x)), then x + mlp(RMSNorm(x))."""

    def __init__(self, dim: int, eps: float, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = mlp
        self.reduce = AllReduce()  # tensor parallel: sums the ranks' partial outputs (models/parallel.py)

    def forward(self, x: torch.Tensor, rope: RotaryTables, meta) -> torch.Tensor:
        x = x + self.reduce(self.self_attn(self.input_layernorm(x), rope, meta))
        return x + self.reduce(self.mlp(self.post_attention_layernorm(x)))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, heads, D) by a step's `RotaryTables`, the PyTorch composition, in float32; same dtype out."""
    xf = x.float()
    half = x.shape[-1] // 2
    return torch.addcmul(xf * cos, xf.roll(half, dims=-1), signed_sin).to(x.dtype)


@dataclass(frozen=True)
class RotaryTables:
    """One step's rotary tables, cos and signed sin (N, 1, D) float32, and the implementation the
    load bound: `rope(x)` rotates x (N, heads, D) to its tokens' positions, same dtype out."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    rotate: Callable  # (x, cos, signed_sin) -> rotated x: apply_rotary or a kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate(x, self.cos, self.signed_sin)


class RotaryEmbedding(nn.Module):
    """Rotary embedding in the HF "rotate half" layout, cos/sin tables precomputed once.

    Supports rope_scaling types default, linear, llama3 and yarn, read from the HF config. Which
    implementation rotates is the load's choice (models/kernels.py binds `rotate`).
    """

    rotate: Callable = staticmethod(apply_rotary)  # (x, cos, signed_sin) -> rotated x

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        # Plain attributes, not buffers: the tables stay float32 when the model moves to bf16.
        self.cos = freqs.cos() * attention_factor  # (P, D/2)
        self.sin = freqs.sin() * attention_factor

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        """cos and signed sin for positions (N,), once per forward: (N, 1, D) float32 each.

        With x = [x1, x2] and roll(x) = [x2, x1], "rotate half" is x * [cos, cos] + roll(x) * [-sin, sin].
        """
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos, sin = self.cos[positions], self.sin[positions]  # (N, D/2)
        return RotaryTables(torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :],
                            self.rotate)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the attention factor for a rope_scaling config."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (use default, linear, llama3 or yarn)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by factor, blend in between."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low_wavelen = old_len / s.get("low_freq_factor", 1.0)
    high_wavelen = old_len / s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - s.get("low_freq_factor", 1.0)) / (
        s.get("high_freq_factor", 4.0) - s.get("low_freq_factor", 1.0)
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_medium, blended, out)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, s: dict) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale attention by mscale.

    DeepSeek configs give `mscale` and `mscale_all_dim`: the rotary tables are scaled by their
    ratio here, and the softmax scale by mscale(mscale_all_dim)^2 in the attention (models/mla.py).
    """
    factor = s["factor"]
    old_len = s.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_get_mscale(factor))

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low if high != low else 1e-3)
    extrapolation_weight = 1 - ramp.clamp(0, 1)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor
