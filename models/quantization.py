"""Weight-only int8 quantization of linear layers (`--quantization int8`), from any checkpoint.

Each output channel n of a weight W (N, K) gets one fp32 scale, s[n] = max_k |W[n, k]| / 127, and
W[n, k] is stored as q = round(W[n, k] / s[n]) in int8: half the bytes of bf16, and decode steps
are bound by streaming the weights. Activations stay bf16 (or fp32); a layer computes

    y = (x @ q^T) * s + bias

Two paths compute it, with the same storage:
  - the int8 kernel (models/csrc/int8_linear.cpp) for bf16 activations on CPUs with AVX512-BF16:
    it reads the int8 bytes and widens them in registers. Decode steps stream half the bytes;
    prefill runs within ~1.2x of oneDNN's packed bf16 (2-core EPYC, GPT-2 shapes, M = 64..512),
    where the reference below is 2-5x slower (it widens the whole weight on every call);
  - the PyTorch reference everywhere else (other CPUs, fp32 models, GPUs): q widened to the
    activation dtype (exact), one matmul, then the scale in fp32.

Every nn.Linear is quantized, the LM head included; a token embedding tied to the head reads its
rows out of the quantized head (`Int8Embedding`), so the table is stored once, in int8. MoE
routed experts (stacked tensors, not nn.Linear) and the router stay in the model dtype.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cpu_kernels import load_kernel
from models.fast_linear import PAIRS64_LAYOUT, replace_module

log = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8",)
_GELU_TANH = 1           # activation code of the kernel


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (N, K) float -> q (N, K) int8, scale (N,) fp32."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,); an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_kernel() -> Callable | None:
    """The compiled kernel's entry point, or None where this CPU or build cannot run it."""
    module = load_kernel("nanoserve_int8_linear", "int8_linear.cpp")
    return module.int8_linear if module is not None and module.int8_linear_available() else None


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with an int8 weight and per-output-channel scales."""

    def __init__(self, linear: nn.Linear, use_kernel: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8(linear.weight)
        self.layout = PAIRS64_LAYOUT  # 64-column blocks of k-pairs: what the kernel streams
        # Parameters (frozen), not buffers: they are the layer's weights wherever weights are counted.
        self.qweight = nn.Parameter(self.layout.order(q).contiguous(), requires_grad=False)  # (ceil(N/64) 64 K,) int8
        self.scale = nn.Parameter(scale, requires_grad=False)                                 # (N,) fp32
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)                                  # (N,) fp32 or None
        on_cpu = linear.weight.device.type == "cpu"
        self.kernel = int8_kernel() if use_kernel and on_cpu and self.in_features % 2 == 0 else None

    def int8_weight(self) -> torch.Tensor:
        """q as (N, K) int8, out of the blocked layout (a copy)."""
        n_blocks = self.qweight.numel() // (self.layout.cols * self.in_features)
        blocked = self.qweight.view(n_blocks, self.in_features // 2, self.layout.cols, 2)  # [n/c][k/2][n%c][k%2]
        return blocked.permute(0, 2, 1, 3).reshape(-1, self.in_features)[:self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, gelu_tanh=False)

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(linear(x), approximate="tanh"), applied before rounding where the kernel runs."""
        return self._linear(x, gelu_tanh=True)

    def _linear(self, x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel is not None and x.dtype == torch.bfloat16:
            y = self.kernel(rows, self.qweight, self.scale, self.bias, self.out_features, _GELU_TANH if gelu_tanh else 0)
        else:
            y = self.reference(rows)
            if gelu_tanh:
                y = F.gelu(y, approximate="tanh")
        return y.reshape(*lead, self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) in PyTorch: q widened to x's dtype (exact), then the scale in fp32."""
        unscaled = F.linear(x, self.int8_weight().to(x.dtype))  # (M, N)
        y = unscaled.float() * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Int8Embedding(nn.Module):
    """Token embedding read out of a tied, quantized LM head: row n is q[n] * s[n]."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._owner = (head,)  # keeps the head's buffers alive without registering them twice
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self._owner[0]
        flat = ids.reshape(-1)
        rows = head.layout.rows(head.qweight, flat, self.embedding_dim)  # (T, C) int8
        out = (rows.float() * head.scale[flat, None]).to(self.dtype)     # (T, C)
        return out.reshape(*ids.shape, self.embedding_dim)


def quantize_linear_layers(model: nn.Module, method: str, use_kernel: bool = True) -> int:
    """Replace every nn.Linear (the LM head too) by its quantized form; returns how many."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATION_METHODS)}")
    head = getattr(model, "lm_head", None)
    tied = [name for name, module in model.named_modules()
            if isinstance(head, nn.Linear) and isinstance(module, nn.Embedding) and module.weight is head.weight]
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    before = _weight_bytes(model)
    for name in targets:  # names, not modules: each float weight is freed once nothing holds it
        quantized = Int8Linear(model.get_submodule(name), use_kernel)
        replace_module(model, name, quantized)
        if name == "lm_head":
            for embedding in tied:
                dtype = model.get_submodule(embedding).weight.dtype
                replace_module(model, embedding, Int8Embedding(quantized, dtype))
    with_kernel = sum(1 for m in model.modules() if isinstance(m, Int8Linear) and m.kernel is not None)
    log.info("quantized %d linear layers to int8 (%.0f -> %.0f MB of weights); %d on the AVX512-BF16 int8 "
             "kernel, %d on the PyTorch reference path", len(targets), before / 1e6, _weight_bytes(model) / 1e6,
             with_kernel, len(targets) - with_kernel)
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors count once
