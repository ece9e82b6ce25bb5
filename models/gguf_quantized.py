"""`--quantization gguf`: a GGUF file's Q4_0 / Q4_1 / Q8_0 tensors served as stored, not dequantized.

llama.cpp's Q4_0, Q4_1 and Q8_0 are blocks of 32 weights along K with fp16 scales:
    Q4_1  [d fp16][m fp16][16 bytes]   w = d q + m
    Q4_0  [d fp16][16 bytes]           w = d (q - 8)      (so m = -8 d, exact in fp16)
    Q8_0  [d fp16][32 int8]            w = d q
In a 4-bit block byte j holds q of element j (low nibble) and of element j + 16 (high nibble).
Those are Int4Linear's and Int8GroupLinear's forms at group 32 (models/quantized_linear.py), so
values and scales move over bit for bit and the layer computes with the file's own weights; a
token embedding tied to a kept head reads its rows out of the head. Tensors of other types
(K-quants, F16) were dequantized by the loader and stay in the model dtype; the log says how many.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.builtin import DEFAULT_MODEL, builtin_model_path
from models.layers import Embedding, Linear
from models.gguf_checkpoint import SUPPORTED_ARCHS, GGUFMetadata, gguf_state_dict
from models.quantized_linear import (Int4Linear, Int8GroupLinear, QuantizedEmbedding, QuantizedLinear,
                                     describe_paths)

log = logging.getLogger(__name__)

GROUP = 32
FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # fused into one linear each (not GPT-2)


def gguf_path(spec: str) -> Path:
    """The GGUF file a model spec names; ValueError for any other kind of model."""
    path = builtin_model_path(spec) if spec == DEFAULT_MODEL else Path(spec).expanduser()
    if path.suffix != ".gguf":
        raise ValueError(f"--quantization gguf keeps a GGUF file's 4-bit tensors; {spec!r} is not a GGUF file")
    return path


def read_q8_0(tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 tensor's values and scales: q (N, K) int8, scale (N, K/32) fp16."""
    n = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # gguf lists shapes innermost first
    k = int(tensor.shape[0])
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // GROUP, 2 + GROUP)  # (N, groups, bytes)
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])  # (N, groups)
    q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
    return q, scale


def read_q4(tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor's values and scales: v (N, K) uint8, scale and minimum (N, K/32) fp16."""
    from gguf import GGMLQuantizationType as T

    n = int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1  # gguf lists shapes innermost first
    k = int(tensor.shape[0])
    has_min = tensor.tensor_type == T.Q4_1
    header = 4 if has_min else 2
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(n, k // GROUP, header + 16)  # (N, groups, bytes)
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])  # (N, groups)
    minimum = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if has_min else -8 * scale
    qs = torch.from_numpy(blocks[..., header:].copy())  # (N, groups, 16)
    v = torch.cat((qs & 15, qs >> 4), dim=-1).reshape(n, k)  # elements j and j + 16 of each block
    return v, scale, minimum


def keep_gguf_weights(model: nn.Module, spec: str, use_kernel: bool = True,
                      activation_dtype: torch.dtype = torch.bfloat16) -> int:
    """Hand every linear whose GGUF tensor is Q4_0 / Q4_1 / Q8_0 to a layer holding the file's
    values (Int4Linear, Int8GroupLinear), a tied LM head included; returns how many."""
    import gguf
    from gguf import GGMLQuantizationType as T

    reader = gguf.GGUFReader(gguf_path(spec))
    arch = GGUFMetadata(reader).arch
    if arch not in SUPPORTED_ARCHS or arch == "deepseek2":
        raise ValueError(f"--quantization gguf reads {', '.join(a for a in SUPPORTED_ARCHS if a != 'deepseek2')} files, not {arch!r}")
    kept = 0
    for types, read, make in (((T.Q4_0, T.Q4_1), read_q4, _int4_layer), ((T.Q8_0,), read_q8_0, _int8_layer)):
        tensors = {t.name: t for t in reader.tensors if t.tensor_type in types}
        names = [name for name in tensors if arch == "gpt2" or _fusion_complete(name, tensors)]  # GPT-2 fuses nothing
        parts = [read(tensors[name]) for name in names]
        # The loader's renames, unpermutes and fusions, applied to the values and to each scale alike.
        mapped = [gguf_state_dict(arch, model, {name: p[i] for name, p in zip(names, parts)})
                  for i in range(len(parts[0]) if parts else 0)]
        by_layer = {name.removesuffix(".weight"): tuple(m[name] for m in mapped) for name in (mapped[0] if mapped else {})}
        _add_tied_head(model, by_layer)
        for module_name, layer_parts in by_layer.items():
            linear = _submodule(model, module_name)
            if (not isinstance(linear, Linear) or linear.kernel is not None
                    or tuple(layer_parts[0].shape) != (linear.out_features, linear.in_features)):
                continue  # a layer dropped by --override layers=N, or an embedding table
            quantized = make(linear, layer_parts, use_kernel)
            for embedding in _tied_embeddings(model, linear):
                embedding.use_kernel(QuantizedEmbedding(quantized, embedding.weight.dtype))
            linear.use_kernel(quantized)
            kept += 1
    others = sum(1 for m in model.modules() if isinstance(m, Linear) and m.kernel is None)
    layers = [m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), QuantizedLinear)]
    log.info("kept %d linear layers as the GGUF stores them (Q4_0/Q4_1/Q8_0, groups of 32; %s); %d in the model "
             "dtype (tensors of other types, or fused with one)", kept, describe_paths(layers, activation_dtype), others)
    return kept


def _int4_layer(linear: Linear, parts: tuple, use_kernel: bool) -> Int4Linear:
    return Int4Linear(linear, GROUP, use_kernel, parts=parts)


def _int8_layer(linear: Linear, parts: tuple, use_kernel: bool) -> Int8GroupLinear:
    return Int8GroupLinear(linear, GROUP, parts, use_kernel)


def _tied_embeddings(model: nn.Module, linear: Linear) -> list[Embedding]:
    """The token embeddings that share `linear`'s weight (a tied LM head's)."""
    return [m for m in model.modules() if isinstance(m, Embedding) and m.kernel is None and m.weight is linear.weight]


def _add_tied_head(model: nn.Module, by_layer: dict[str, tuple]) -> None:
    """A tied head computes with the embedding table, as the loader made it, whatever `output.weight`
    a file also carries (llama.cpp writes GPT-2's twice): it gets the table's parts, or none."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, Linear) or head.kernel is not None:
        return
    for name, module in model.named_modules():
        if isinstance(module, Embedding) and module.kernel is None and module.weight is head.weight:
            by_layer.pop("lm_head", None)
            if name in by_layer:
                by_layer["lm_head"] = by_layer[name]


def _fusion_complete(name: str, tensors: dict) -> bool:
    """A tensor fused with others into one linear is kept only if all of them are of its kind."""
    for group in FUSED:
        for part in group:
            if f".{part}." in name:
                return all(name.replace(f".{part}.", f".{other}.") in tensors for other in group)
    return True


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
