"""Optional speed feature: linear layers with pre-packed bf16 weights (CPU).

PyTorch's `F.linear` re-lays out the weight for oneDNN on every call; packing it once, as
inductor's freezing pass does, is faster with the same bf16 results. Decode steps multiply only
a few rows (M <= 32) and are bound by streaming the weights; there oneDNN's AMX kernel reads
~8 GB/s on this 2-core machine, so rows up to `AMX_MAX_ROWS` go to models/csrc/amx_linear.cpp,
which streams the same packed buffer at ~20 GB/s. Prefill (large M) stays on oneDNN.

GELU(tanh) can be fused into the matmul's epilogue (`PackedLinear.forward_gelu_tanh`), saving a
pass over the MLP's widest activation. The LM head is packed only when the AMX kernel takes it
(oneDNN alone is no faster there); a head tied to the token embedding then serves the embedding
too (`PackedEmbedding` reads rows out of the packed buffer), so the table is stored once.
`pack_linear_layers` is the one switch; without it the plain modules run.
"""
from __future__ import annotations

import ctypes
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.cpu_kernels import load_kernel

log = logging.getLogger(__name__)

AMX_MAX_ROWS = 32  # larger batches re-read the weight per 32 rows; oneDNN blocks them better
_GELU_TANH = 1     # activation codes of amx_linear


def amx_kernel():
    """The AMX linear module when this CPU, kernel and process can run AMX tiles, else None."""
    kernel = load_kernel("nanoserve_amx_linear", "amx_linear.cpp")
    return kernel if kernel is not None and kernel.amx_available() else None


def _packed_values(packed: torch.Tensor) -> torch.Tensor:
    """A flat bf16 view of an opaque packed tensor's buffer (valid while `packed` lives)."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    raw = (ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(raw, dtype=torch.bfloat16)


class PackedLinear(nn.Module):
    """Drop-in for nn.Linear with the weight stored in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear, use_amx: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = nn.Parameter(
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None), requires_grad=False)
        self.bias = linear.bias
        self.amx = amx_kernel() if use_amx else None
        if self.amx is not None and not _is_amx_layout(self.packed_weight, linear.weight):
            self.amx = None
        # address and size of the opaque packed buffer, read once (this module keeps it alive)
        self.weight_buffer = (torch.ops.mkldnn.data_ptr(self.packed_weight), torch.ops.mkldnn._nbytes(self.packed_weight))
        bias_f32 = None if linear.bias is None or self.amx is None else linear.bias.detach().float()
        self.register_buffer("bias_f32", bias_f32, persistent=False)  # the AMX epilogue adds in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None and x.shape[0] <= AMX_MAX_ROWS:
            return self.amx.amx_linear(x, *self.weight_buffer, self.bias_f32, self.out_features, 0)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def forward_gelu_tanh(self, x: torch.Tensor) -> torch.Tensor:
        """gelu(linear(x), approximate="tanh") with the activation applied before rounding to bf16."""
        if self.amx is not None and x.shape[0] <= AMX_MAX_ROWS:
            return self.amx.amx_linear(x, *self.weight_buffer, self.bias_f32, self.out_features, _GELU_TANH)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "gelu", [], "tanh")


def linear_gelu_tanh(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GELU(tanh) of a linear layer's output, fused into the matmul when the layer is packed."""
    if isinstance(linear, PackedLinear):
        return linear.forward_gelu_tanh(x)
    return F.gelu(linear(x), approximate="tanh")


def _is_amx_layout(packed: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN chose the AB16b32a2b layout the AMX kernel reads (checked on the bytes)."""
    out_features, in_features = weight.shape
    padded_out = -(-out_features // 32) * 32
    if in_features % 32 or torch.ops.mkldnn._nbytes(packed) < padded_out * in_features * 2:
        return False
    packed_values = _packed_values(packed)[:padded_out * in_features]
    padded = F.pad(weight.detach(), (0, 0, 0, padded_out - out_features))  # zero rows up to a whole block
    # W[n][k] -> [n / 32][k / 32][(k % 32) / 2][n % 32][k % 2]
    expected = padded.reshape(padded_out // 32, 32, in_features // 32, 16, 2).permute(0, 2, 3, 1, 4)
    return torch.equal(packed_values, expected.flatten())


class PackedEmbedding(nn.Module):
    """Token embedding read out of a tied LM head's packed (AB16b32a2b) weight."""

    def __init__(self, head: PackedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._owner = (head,)  # keeps the buffer alive without registering the head twice
        blocks = -(-head.out_features // 32)
        values = _packed_values(head.packed_weight)[:blocks * 32 * head.in_features]
        self._blocks = values.view(blocks, head.in_features // 32, 16, 32, 2)  # [n/32][k/32][k%32/2][n%32][k%2]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._blocks[flat // 32, :, :, flat % 32, :]  # (T, K/32, 16, 2)
        return rows.reshape(*ids.shape, self.embedding_dim)


def can_pack(model: nn.Module) -> bool:
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linear_layers(model: nn.Module, use_amx: bool = True) -> int:
    """Replace nn.Linear layers by PackedLinear (the LM head only for AMX); returns how many."""
    if not can_pack(model):
        return 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]
    for name, linear in targets:
        _replace(model, name, PackedLinear(linear, use_amx))
    packed_head = _pack_lm_head(model, use_amx)
    on_amx = sum(1 for module in model.modules() if isinstance(module, PackedLinear) and module.amx is not None)
    log.info("packed %d linear layers for oneDNN (%d with the AMX small-batch kernel)",
             len(targets) + packed_head, on_amx)
    return len(targets) + packed_head


def _pack_lm_head(model: nn.Module, use_amx: bool) -> bool:
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return False
    packed = PackedLinear(head, use_amx)
    if packed.amx is None:
        return False
    tied = [name for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and module.weight is head.weight]
    model.lm_head = packed
    for name in tied:
        _replace(model, name, PackedEmbedding(packed))
    return True


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
