"""`--quantization gguf`: a GGUF file's 4-bit tensors served as stored, not dequantized.

llama.cpp's Q4_0 and Q4_1 are blocks of 32 weights along K with fp16 scales:
    Q4_1  [d fp16][m fp16][16 bytes]   w = d q + m
    Q4_0  [d fp16][16 bytes]           w = d (q - 8)      (so m = -8 d, exact in fp16)
byte j of the 16 holds q of element j (low nibble) and of element j + 16 (high nibble). That is
Int4Linear's form at group 32 (models/quantized_linear.py), so the values and scales move over
bit for bit and the layer computes with the file's own weights. Tensors of other types (Q8_0,
K-quants, F16) were dequantized by the loader and stay in the model dtype; the log says how many.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from models.builtin import DEFAULT_MODEL, builtin_model_path
from models.layers import Linear
from models.gguf_checkpoint import SUPPORTED_ARCHS, GGUFMetadata, gguf_state_dict
from models.quantized_linear import Int4Linear

log = logging.getLogger(__name__)

GROUP = 32
FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # fused into one linear each (not GPT-2)


def gguf_path(spec: str) -> Path:
    """The GGUF file a model spec names; ValueError for any other kind of model."""
    path = builtin_model_path(spec) if spec == DEFAULT_MODEL else Path(spec).expanduser()
    if path.suffix != ".gguf":
        raise ValueError(f"--quantization gguf keeps a GGUF file's 4-bit tensors; {spec!r} is not a GGUF file")
    return path


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


def keep_gguf_weights(model: nn.Module, spec: str, use_kernel: bool = True) -> int:
    """Hand every linear whose GGUF tensor is Q4_0 / Q4_1 to an Int4Linear holding the file's
    values; returns how many."""
    import gguf
    from gguf import GGMLQuantizationType as T

    reader = gguf.GGUFReader(gguf_path(spec))
    arch = GGUFMetadata(reader).arch
    if arch not in SUPPORTED_ARCHS or arch == "deepseek2":
        raise ValueError(f"--quantization gguf reads {', '.join(a for a in SUPPORTED_ARCHS if a != 'deepseek2')} files, not {arch!r}")
    q4 = {t.name: t for t in reader.tensors if t.tensor_type in (T.Q4_0, T.Q4_1)}
    names = [name for name in q4 if arch == "gpt2" or _fusion_complete(name, q4)]  # GPT-2 fuses nothing
    parts = [read_q4(q4[name]) for name in names]
    # The loader's renames, unpermutes and fusions, applied to the values and to each scale alike.
    mapped = [gguf_state_dict(arch, model, {name: p[i] for name, p in zip(names, parts)}) for i in range(3)]
    kept = 0
    for weight_name, v in mapped[0].items():
        module_name = weight_name.removesuffix(".weight")
        linear = _submodule(model, module_name)
        if (not isinstance(linear, Linear) or linear.kernel is not None
                or tuple(v.shape) != (linear.out_features, linear.in_features)):
            continue  # a layer dropped by --override layers=N, or an embedding table
        linear.use_kernel(Int4Linear(linear, GROUP, use_kernel, parts=(v, mapped[1][weight_name], mapped[2][weight_name])))
        kept += 1
    others = sum(1 for m in model.modules() if isinstance(m, Linear) and m.kernel is None)
    log.info("kept %d linear layers as the GGUF stores them (Q4_0/Q4_1, 4-bit groups of 32); %d in the model "
             "dtype (tensors of other types, or tied to one)", kept, others)
    return kept


def _fusion_complete(name: str, q4: dict) -> bool:
    """A tensor fused with others into one linear is kept only if all of them are 4-bit."""
    for group in FUSED:
        for part in group:
            if f".{part}." in name:
                return all(name.replace(f".{part}.", f".{other}.") in q4 for other in group)
    return True


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
