"""Weight-only quantization of linear layers (`--quantization`), at load, from any checkpoint.

    int8                    one fp32 scale per output channel: half the bytes of bf16
    int4, int4-g64, -g128   4-bit, an fp16 scale and minimum per group of 32 (64, 128) weights
                            along K: 5 (4.5, 4.25) bits a weight
    gguf                    a GGUF file's Q4_0 / Q4_1 tensors as stored (models/gguf_quantized.py)

Activations stay bf16 (or fp32). Every Linear hands its matmul to a quantized kernel module
(models/quantized_linear.py), the LM head included; a token embedding tied to the head reads
its rows out of the quantized head (`QuantizedEmbedding`), so the table is stored once. MoE
routed experts (stacked tensors, not nn.Linear) and the router keep the model dtype.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from models.layers import Embedding, Linear, dense_layers
from models.quantized_linear import Int4Linear, Int8Linear, QuantizedEmbedding, QuantizedLinear, describe_paths

log = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int8", "int4", "int4-g64", "int4-g128", "gguf")


def quantize_model(model: nn.Module, spec: str, method: str | None, use_kernel: bool = True,
                   activation_dtype: torch.dtype = torch.bfloat16) -> int:
    """Quantize `model` (loaded from `spec`) in place; returns how many linears changed. A model
    an earlier engine quantized keeps its layers, and must be asked for the same method.
    activation_dtype: the model's, for the load log's account of which path the layers take."""
    done = getattr(model, "quantization", None)
    if done is not None or method is None:
        if done != method:
            raise ValueError(f"this model's linears are already {done or 'unquantized'}; "
                             f"it cannot be served with --quantization {method or 'none'} as well")
        return 0
    if method == "gguf":
        from models.gguf_quantized import keep_gguf_weights

        count = keep_gguf_weights(model, spec, use_kernel, activation_dtype)
    else:
        count = quantize_linear_layers(model, method, use_kernel, activation_dtype)
    model.quantization = method
    return count


def group_size(method: str) -> int:
    """The group of an int4 method: int4 -> 32, int4-g64 -> 64."""
    return int(method.removeprefix("int4").removeprefix("-g") or 32)


def check_quantizable(linear: nn.Linear, method: str, name: str) -> None:
    """ValueError, in one sentence, for a layer `method` cannot store."""
    k = linear.in_features
    if method == "int8" and k % 2:
        raise ValueError(f"--quantization int8 pairs input features; {name} has an odd number ({k})")
    if method.startswith("int4") and k % group_size(method):
        raise ValueError(f"--quantization {method}: {name}'s {k} input features do not split into groups "
                         f"of {group_size(method)}")


def make_quantized(linear: nn.Linear, method: str, use_kernel: bool = True) -> QuantizedLinear:
    """`linear` as `method` stores it."""
    check_quantizable(linear, method, "the layer")
    if method == "int8":
        return Int8Linear(linear, use_kernel)
    return Int4Linear(linear, group_size(method), use_kernel)


def quantize_linear_layers(model: nn.Module, method: str, use_kernel: bool = True,
                           activation_dtype: torch.dtype = torch.bfloat16) -> int:
    """Hand every Linear's matmul (the LM head's too) to its quantized form; returns how many."""
    if method not in QUANTIZATION_METHODS or method == "gguf":
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATION_METHODS[:-1])} "
                         f"(gguf: quantize_model)")
    head = getattr(model, "lm_head", None)
    tied = [m for _, m in dense_layers(model, Embedding) if isinstance(head, Linear) and m.weight is head.weight]
    targets = dense_layers(model)
    for name, linear in targets:  # every layer checked before any is quantized: all or none
        check_quantizable(linear, method, name)
    before = _weight_bytes(model)
    for name, linear in targets:  # each float weight is freed once nothing holds it
        quantized = make_quantized(linear, method, use_kernel)
        linear.use_kernel(quantized)
        if name == "lm_head":
            for embedding in tied:
                embedding.use_kernel(QuantizedEmbedding(quantized, embedding.weight.dtype))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    log.info("quantized %d linear layers to %s (%.0f -> %.0f MB of weights); %s", len(targets), method,
             before / 1e6, _weight_bytes(model) / 1e6, describe_paths(layers, activation_dtype))
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # shared tensors count once
