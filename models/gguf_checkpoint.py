"""llama.cpp GGUF files -> our modules, dequantized with the `gguf` package.

GGUF tensor names are renamed to the HF names and then go through the HF conversion. One
exception matters: llama.cpp's converter stores the q and k rows of Llama-architecture models
permuted for its interleaved RoPE. Within each head it reorders the D rows
    [0 .. D/2) [D/2 .. D)   (HF rotate-half pairs i and i + D/2)
    -> 0, D/2, 1, D/2+1, ... (interleaved pairs 2i and 2i+1)
so we undo it, or the model talks nonsense. Qwen2/Qwen3 GGUFs use NEOX RoPE and are not permuted.
DeepSeek's `deepseek2` files have their own module (models/gguf_deepseek2.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.gguf_deepseek2 import build_deepseek2
from models.gguf_tokenizer import tokenizer_from_gguf
from models.gpt2 import GPT2, GPT2Config
from models.hf_checkpoint import hf_to_qwen_state_dict
from models.qwen import QwenConfig, QwenModel
from models.state_dict import load_state_dict

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gpt2", "deepseek2")

QWEN_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
QWEN_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GPT2_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f", "output": "lm_head",
}
GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}


def load_gguf(path: Path) -> tuple[torch.nn.Module, "Tokenizer", int]:
    """Model, tokenizer and context length from a GGUF file."""
    import gguf


    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad files
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from e
    meta = GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; nanoserve runs {', '.join(SUPPORTED_ARCHS)}")
    tensors = {t.name: dequantize(t) for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor")}
    if arch == "deepseek2":
        model, state_dict, max_len = build_deepseek2(meta, tensors)
    else:
        model, max_len = _gpt2_model(meta) if arch == "gpt2" else _qwen_model(meta, arch, tied="output.weight" not in tensors)
        state_dict = gguf_state_dict(arch, model, tensors)
    load_state_dict(model, state_dict)
    return model, tokenizer_from_gguf(reader), max_len


def gguf_state_dict(arch: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF-named tensors -> our parameter names: renamed, llama's q/k rows unpermuted, q/k/v and
    gate/up fused. Row operations only, so it maps any per-row data (models/gguf_quantized.py)."""
    if arch == "gpt2":
        return {_gpt2_name(k): v for k, v in tensors.items()}
    if arch == "llama":
        _unpermute_llama_qk(tensors, model.config)
    return hf_to_qwen_state_dict({_qwen_name(k): v for k, v in tensors.items()})


class GGUFMetadata:
    """Key/value metadata of a GGUF file as plain Python values."""

    def __init__(self, reader):
        self.fields = reader.fields
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def arch_get(self, key: str, default=None):
        return self.get(f"{self.arch}.{key}", default)

    def require(self, key: str):
        value = self.arch_get(key)
        if value is None:
            raise ValueError(f"GGUF file lacks the metadata key {self.arch}.{key}")
        return value


def dequantize(tensor) -> torch.Tensor:
    import gguf

    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # numpy, (out, in) order
    return torch.from_numpy(np.array(data, dtype=np.float32))  # copy: F32 data is a read-only mmap view


def _qwen_model(meta: GGUFMetadata, arch: str, tied: bool) -> tuple[QwenModel, int]:
    heads = meta.require("attention.head_count")
    scaling = None
    if meta.arch_get("rope.scaling.type") in ("linear", "yarn"):
        scaling = {"rope_type": meta.arch_get("rope.scaling.type"), "factor": meta.arch_get("rope.scaling.factor"),
                   "original_max_position_embeddings": meta.arch_get("rope.scaling.original_context_length")}
    config = QwenConfig(
        vocab_size=meta.arch_get("vocab_size") or len(meta.get("tokenizer.ggml.tokens")),
        hidden_size=meta.require("embedding_length"),
        intermediate_size=meta.require("feed_forward_length"),
        num_hidden_layers=meta.require("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.arch_get("attention.head_count_kv", heads),
        head_dim=meta.arch_get("attention.key_length"),
        max_position_embeddings=meta.require("context_length"),
        rope_theta=meta.arch_get("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings=tied,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
    )
    with torch.device("meta"):
        return QwenModel(config), config.max_position_embeddings


def _gpt2_model(meta: GGUFMetadata) -> tuple[GPT2, int]:
    config = GPT2Config(
        vocab_size=len(meta.get("tokenizer.ggml.tokens")),
        n_positions=meta.require("context_length"),
        n_embd=meta.require("embedding_length"),
        n_layer=meta.require("block_count"),
        n_head=meta.require("attention.head_count"),
        layer_norm_epsilon=meta.arch_get("attention.layer_norm_epsilon", 1e-5),
    )
    with torch.device("meta"):
        return GPT2(config), config.n_positions


def _rename(name: str, top: dict[str, str], per_layer: dict[str, str], layer_prefix: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if match:
        layer, part, kind = match.groups()
        if part not in per_layer:
            raise ValueError(f"unexpected GGUF tensor {name}")
        return f"{layer_prefix}.{layer}.{per_layer[part]}.{kind}"
    stem, _, kind = name.rpartition(".")
    if stem in top:
        return f"{top[stem]}.{kind}"
    if name in top:
        return top[name]
    raise ValueError(f"unexpected GGUF tensor {name}")


def _qwen_name(name: str) -> str:
    return _rename(name, QWEN_NAMES, QWEN_LAYER_NAMES, "model.layers")


def _gpt2_name(name: str) -> str:
    return _rename(name, GPT2_NAMES, GPT2_LAYER_NAMES, "transformer.h")


def _unpermute_llama_qk(tensors: dict[str, torch.Tensor], config: QwenConfig) -> None:
    """Invert llama.cpp's q/k row permutation (see the module docstring), in place."""
    for name, value in tensors.items():
        if ".attn_q." in name:
            tensors[name] = unpermute_rows(value, config.num_attention_heads)
        elif ".attn_k." in name:
            tensors[name] = unpermute_rows(value, config.num_key_value_heads)


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(heads*D, ...) rows interleaved per head -> rotate-half order."""
    rest = w.shape[1:]
    w = w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *rest)  # (heads, D/2, 2, ...)
    return w.transpose(1, 2).reshape(-1, *rest)  # (heads, 2, D/2, ...) -> (heads*D, ...)
