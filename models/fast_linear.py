"""Optional speed feature: linear layers with pre-packed bf16 weights (CPU).

PyTorch's `F.linear` re-lays out the weight for oneDNN on every call; packing it once, as
inductor's freezing pass does, is faster with the same bf16 results. Decode steps multiply only
a few rows (M <= 32) and are bound by streaming the weights, which oneDNN does slowly at small M
(~8 GB/s on a 2-core machine). There a small-batch kernel streams the same packed buffer:
models/csrc/amx_linear.cpp on CPUs with AMX tiles, models/csrc/bf16_dot_linear.cpp with
AVX512-BF16 dot products on CPUs without AMX (oneDNN lays the weight out differently for each,
and each kernel reads its CPU's layout, checked byte for byte at pack time). Prefill (large M)
stays on oneDNN, except for an LM head on AMX (`PackedLinear.forward_float32`).

CPUs without AVX-512 (AVX2 + FMA only) get no bf16 path from oneDNN at all: it refuses to pack
bf16 weights there, and ATen's bf16 matmul runs ~3x slower than float32. There
models/csrc/bf16_avx2_linear.cpp packs the weight itself (PAIRS32_LAYOUT) and takes every row
count, prefill included.

GELU(tanh) can be fused into the matmul's epilogue (`PackedLinear.forward_gelu_tanh`), saving a
pass over the MLP's widest activation. The LM head is packed only when a small-batch kernel takes
it (oneDNN alone is no faster there); a head tied to the token embedding then serves the embedding
too (`PackedEmbedding` reads rows out of the packed buffer), so the table is stored once.
`pack_linear_layers` is the one switch; without it the plain modules run.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cpu_kernels import load_kernel
from models.layers import Embedding, Linear, dense_layers

log = logging.getLogger(__name__)

_GELU_TANH = 1     # activation code of the small-batch kernels


@dataclass(frozen=True)
class PackedLayout:
    """A blocked bf16 weight layout oneDNN picks for this CPU:

        W[n][k] at [n / cols][k / k_group][(k % k_group) / 2][n % cols][k % 2]   (N padded to cols)

    AMX CPUs get 32-column blocks of 32-deep K groups (AB16b32a2b); CPUs with AVX512-BF16 and no
    AMX get 64-column blocks of all of K in pairs (k_group None). The AVX2 kernel packs its own
    weights in 32-column blocks of pairs (four 256-bit vectors a k-pair).
    """

    cols: int
    k_group: int | None

    def order(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (N, K) in this layout's memory order, flat, N zero-padded to whole blocks."""
        out_features, in_features = weight.shape
        group = self.k_group or in_features
        padded = F.pad(weight, (0, 0, 0, -(-out_features // self.cols) * self.cols - out_features))
        blocks = padded.reshape(-1, self.cols, in_features // group, group // 2, 2)  # [n/c][n%c][k/g][k%g/2][k%2]
        return blocks.permute(0, 2, 3, 1, 4).flatten()

    def rows(self, values: torch.Tensor, ids: torch.Tensor, in_features: int) -> torch.Tensor:
        """Rows `ids` (T,) of the weight out of its packed `values` -> (T, K)."""
        group = self.k_group or in_features
        blocked = values.view(-1, in_features // group, group // 2, self.cols, 2)  # [n/c][k/g][k%g/2][n%c][k%2]
        return blocked[ids // self.cols, :, :, ids % self.cols, :].reshape(len(ids), in_features)  # (T, K)


AMX_LAYOUT = PackedLayout(cols=32, k_group=32)
PAIRS64_LAYOUT = PackedLayout(cols=64, k_group=None)
PAIRS32_LAYOUT = PackedLayout(cols=32, k_group=None)


@dataclass(frozen=True)
class SmallBatchKernel:
    """A C++ linear for decode-sized batches that streams a packed buffer in `layout`: oneDNN's,
    or (`packs_itself`) one this module lays out because oneDNN has no bf16 path on this CPU."""

    name: str
    layout: PackedLayout
    max_rows: int      # more rows re-read the weight too often; oneDNN blocks them better
    linear: Callable   # (x, address, nbytes, bias_f32 | None, N, activation, float_output=False) -> y
    packs_itself: bool = False  # the kernel takes every row count: there is no oneDNN to hand over to
    # rows up to which an LM head's float32 logits come from this kernel (past them oneDNN's bf16,
    # widened): AMX makes one pass over the weight per 32 rows, as fast as oneDNN up to 256 rows
    # of GPT-2's head (16.1 against 21.6 ms); the AVX512-BF16 kernel re-reads x for every block
    head_rows: int = 0


def onednn_packs_bf16() -> bool:
    """Whether oneDNN has a bf16 path on this CPU (AVX512-BW/VL/DQ or AVX-NE-CONVERT)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def own_layout_kernel() -> SmallBatchKernel | None:
    """The AVX2 + FMA kernel for CPUs where oneDNN cannot pack bf16 (None: not needed or not built)."""
    if onednn_packs_bf16():
        return None
    avx2 = load_kernel("nanoserve_bf16_avx2_linear", "bf16_avx2_linear.cpp")
    if avx2 is None or not avx2.bf16_avx2_available():
        return None
    return SmallBatchKernel("AVX2", PAIRS32_LAYOUT, sys.maxsize, avx2.bf16_avx2_linear, packs_itself=True,
                            head_rows=sys.maxsize)


def small_batch_kernels() -> list[SmallBatchKernel]:
    """The kernels this CPU and build can run on oneDNN's packed buffers, in order of preference."""
    kernels = []
    amx = load_kernel("nanoserve_amx_linear", "amx_linear.cpp")
    if amx is not None and amx.amx_available():
        kernels.append(SmallBatchKernel("AMX", AMX_LAYOUT, 32, amx.amx_linear, head_rows=sys.maxsize))
    dot = load_kernel("nanoserve_bf16_dot_linear", "bf16_dot_linear.cpp")
    if dot is not None and dot.bf16_dot_available():
        kernels.append(SmallBatchKernel("AVX512-BF16", PAIRS64_LAYOUT, 32, dot.bf16_dot_linear, head_rows=32))
    return kernels


def _packed_values(packed: torch.Tensor) -> torch.Tensor:
    """A flat bf16 view of a packed tensor's buffer: oneDNN's opaque one (valid while `packed`
    lives), or a plain tensor in a layout of our own."""
    if not packed.is_mkldnn:
        return packed.view(-1)
    nbytes = torch.ops.mkldnn._nbytes(packed)
    raw = (ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(raw, dtype=torch.bfloat16)


def _in_layout(packed: torch.Tensor, weight: torch.Tensor, layout: PackedLayout) -> bool:
    """Whether oneDNN stored `weight` in `layout` (checked on the bytes, once at pack time)."""
    out_features, in_features = weight.shape
    if in_features % 32 or (layout.k_group and in_features % layout.k_group):
        return False
    expected = layout.order(weight.detach())
    if torch.ops.mkldnn._nbytes(packed) < expected.numel() * 2:
        return False
    return torch.equal(_packed_values(packed)[:expected.numel()], expected)


class PackedLinear(nn.Module):
    """A Linear's kernel (models/layers.py) with the weight stored in oneDNN's blocked layout;
    decode-sized batches go to a small-batch kernel when one reads this CPU's layout. Where
    oneDNN has no bf16 path, the AVX2 kernel packs the weight in its own layout and runs alone.

    The kernels get the buffer's address, read once here: nothing may re-allocate
    `packed_weight` afterwards (no `.to()`, `.float()` or `load_state_dict` on a packed model)."""

    def __init__(self, linear: nn.Linear, use_small_batch: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        own = own_layout_kernel()
        if own is not None:  # no oneDNN bf16 here: use_small_batch has nothing to choose between
            assert can_pack_layer(linear), f"the {own.name} kernel needs an even in_features, not {linear.in_features}"
            self.kernel = own
            self.packed_weight = nn.Parameter(own.layout.order(linear.weight.detach()).contiguous(), requires_grad=False)
            self.weight_buffer = (self.packed_weight.data_ptr(), self.packed_weight.numel() * self.packed_weight.element_size())
        else:
            self.packed_weight = nn.Parameter(
                torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None), requires_grad=False)
            kernels = small_batch_kernels() if use_small_batch else []
            self.kernel = next((k for k in kernels if _in_layout(self.packed_weight, linear.weight, k.layout)), None)
            # address and size of the opaque packed buffer, read once (this module keeps it alive)
            self.weight_buffer = (torch.ops.mkldnn.data_ptr(self.packed_weight), torch.ops.mkldnn._nbytes(self.packed_weight))
        bias_f32 = None if linear.bias is None or self.kernel is None else linear.bias.detach().float()
        self.register_buffer("bias_f32", bias_f32, persistent=False)  # the kernels' epilogue adds in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and x.shape[0] <= self.kernel.max_rows:  # _buffers: no Module lookup
            return self.kernel.linear(x, *self.weight_buffer, self._buffers["bias_f32"], self.out_features, 0)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """linear(x) as float32 (an LM head's logits): the kernel's sums, not rounded to bf16, up
        to its `head_rows` (every row count on AMX and on the AVX2 kernel, 32 rows on
        AVX512-BF16); past them, or without a kernel, oneDNN's bf16 output widened."""
        if self.kernel is not None and x.shape[0] <= self.kernel.head_rows:
            return self.kernel.linear(x, *self.weight_buffer, self._buffers["bias_f32"], self.out_features, 0, True)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "").float()

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(linear(x), approximate="tanh") with the activation applied before rounding to bf16."""
        if self.kernel is not None and x.shape[0] <= self.kernel.max_rows:
            return self.kernel.linear(x, *self.weight_buffer, self._buffers["bias_f32"], self.out_features, _GELU_TANH)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "gelu", [], "tanh")


class PackedEmbedding(nn.Module):
    """Token embedding read out of a tied LM head's packed weight (in its kernel's layout)."""

    def __init__(self, head: PackedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._owner = (head,)  # keeps the buffer alive without registering the head twice
        self._layout = head.kernel.layout
        padded_rows = -(-head.out_features // self._layout.cols) * self._layout.cols
        self._values = _packed_values(head.packed_weight)[:padded_rows * head.in_features]  # oneDNN may pad the buffer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._layout.rows(self._values, ids.reshape(-1), self.embedding_dim)  # (T, C)
        return rows.reshape(*ids.shape, self.embedding_dim)


def can_pack(model: nn.Module) -> bool:
    """Whether the model is bf16 on a CPU with a packed path: oneDNN's, or the AVX2 kernel."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return False
    return (onednn_packs_bf16() and hasattr(torch.ops.mkldnn, "_linear_pointwise")) or own_layout_kernel() is not None


def can_pack_layer(linear: nn.Linear) -> bool:
    """oneDNN packs any shape; the AVX2 kernel's k-pairs need an even in_features."""
    return own_layout_kernel() is None or linear.in_features % 2 == 0


def pack_linear_layers(model: nn.Module, use_small_batch: bool = True) -> int:
    """Hand every unquantized Linear's matmul to a PackedLinear (the LM head only where a
    small-batch kernel takes it); returns how many. Logs which path the linears take on this CPU."""
    if not can_pack(model):
        return 0
    targets = [(name, m) for name, m in dense_layers(model) if name != "lm_head" and can_pack_layer(m)]
    for _, linear in targets:  # each dense weight is freed as soon as it is packed
        linear.use_kernel(PackedLinear(linear, use_small_batch))
    packed_head = _pack_lm_head(model, use_small_batch)
    if not targets and not packed_head:
        return 0  # e.g. every linear is quantized already
    num_packed = len(targets) + packed_head
    own = own_layout_kernel()
    if own is not None:
        left = len(dense_layers(model))  # the kernel takes every even in_features, the head's included
        log.info("packed %d linear layers for the %s bf16 kernel, every batch size (oneDNN has no bf16 path on "
                 "this CPU)%s", num_packed, own.name, f"; {left} with an odd in_features stay on F.linear" if left else "")
        return num_packed
    by_kernel = Counter(m.kernel.name for m in model.modules() if isinstance(m, PackedLinear) and m.kernel is not None)
    kernels = ", ".join(f"{count} with the {name} small-batch kernel" for name, count in by_kernel.items())
    log.info("packed %d linear layers for oneDNN (%s)", num_packed,
             kernels or "none with a small-batch kernel: this CPU has neither AMX nor AVX512-BF16")
    return num_packed


def _pack_lm_head(model: nn.Module, use_small_batch: bool) -> bool:
    head = getattr(model, "lm_head", None)
    if not isinstance(head, Linear) or head.kernel is not None or not can_pack_layer(head):
        return False
    packed = PackedLinear(head, use_small_batch)
    if packed.kernel is None:
        return False
    tied = [m for _, m in dense_layers(model, Embedding) if m.weight is head.weight]
    head.use_kernel(packed)
    for embedding in tied:
        embedding.use_kernel(PackedEmbedding(packed))
    return True
