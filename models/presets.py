"""`random:<preset>`: real architectures' shapes with seeded random weights, for speed work.

GPT-2 presets use the GPT-2 tokenizer, Qwen presets the real Qwen vocabulary, and so do the
DeepSeek presets (no DeepSeek tokenizer ships in a registry package); the tiny presets are small
enough for tests and keep those vocabularies.
"""
from __future__ import annotations

import torch

from models.base import CausalLM, KVCacheSpec
from models.deepseek import DEEPSEEK_PRESETS, DeepseekConfig, DeepseekModel
from models.gpt2 import GPT2, GPT2_PRESETS, GPT2Config
from models.overrides import apply_overrides
from models.qwen import QWEN_PRESETS, QwenConfig, QwenModel

TINY_PRESETS = {
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_head=4, n_embd=64)),
    "tiny-qwen2": ("qwen", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)),
    "tiny-qwen3": ("qwen", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                max_position_embeddings=4096, qkv_bias=False, qk_norm=True)),
    "tiny-qwen3-moe": ("qwen", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                    max_position_embeddings=4096, qkv_bias=False, qk_norm=True,
                                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)),
    "tiny-deepseek-v2": ("deepseek", dict(vocab_size=151936, hidden_size=64, intermediate_size=128,
                                          moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                          v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                                          num_experts_per_tok=2, first_k_dense_replace=1)),
    "tiny-deepseek-v3": ("deepseek", dict(vocab_size=151936, hidden_size=64, intermediate_size=128,
                                          moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                                          qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                                          n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                          scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                                          topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)),
}


def preset_names() -> list[str]:
    return sorted([*GPT2_PRESETS, *QWEN_PRESETS, *DEEPSEEK_PRESETS, *TINY_PRESETS])


def random_model(name: str, seed: int = 0, overrides: dict[str, str] | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[CausalLM, "Tokenizer", int]:
    """A seeded random model in the shapes of preset `name`, with its family's tokenizer.

    overrides: architecture knobs (models/overrides.py), checked before any tensor is built.
    dtype: the weights are allocated in it directly (built on the meta device, then filled), so
    loading gpt2-xl in bf16 never holds a float32 copy: peak memory is the served model's.
    """
    from models.tokenizer import gpt2_tokenizer, qwen_tokenizer

    family, shape = _lookup(name)
    if overrides:
        shape = apply_overrides(family, shape, overrides)
    if family == "gpt2":
        config, tokenizer = GPT2Config(**shape), gpt2_tokenizer()
    elif family == "deepseek":
        config, tokenizer = DeepseekConfig(**shape), qwen_tokenizer()
    else:
        config = QwenConfig(**shape)
        tokenizer = _smollm2_tokenizer() if config.vocab_size == 49152 else qwen_tokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"vocab={config.vocab_size}: must be at least the tokenizer's {tokenizer.vocab_size} tokens")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = _build(family, config)
    model = _materialize(model, dtype)
    init_weights(model)
    return model, tokenizer, model.max_positions


def preset_footprint(name: str, overrides: dict[str, str] | None = None) -> tuple[int, KVCacheSpec]:
    """Parameter count and KV layout of preset `name` with `overrides`, from a model built on
    the meta device: exact, and no memory spent (the sweep's fits-in-memory check)."""
    family, shape = _lookup(name)
    if overrides:
        shape = apply_overrides(family, shape, overrides)
    config = {"gpt2": GPT2Config, "deepseek": DeepseekConfig, "qwen": QwenConfig}[family](**shape)
    with torch.device("meta"):
        model = _build(family, config)
    return sum(p.numel() for p in model.parameters()), model.kv_cache_spec


def _materialize(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    """Allocate a meta-device model's tensors on the CPU in `dtype` (uninitialized), keeping
    tied parameters (the LM head and the embedding) one tensor."""
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, attr))
    model = model.to(dtype).to_empty(device="cpu")
    for (first, first_attr), *others in (group for group in owners.values() if len(group) > 1):
        for module, attr in others:
            setattr(module, attr, getattr(first, first_attr))
    return model


def _build(family: str, config) -> CausalLM:
    return {"gpt2": GPT2, "deepseek": DeepseekModel, "qwen": QwenModel}[family](config)


def _lookup(name: str) -> tuple[str, dict]:
    if name in GPT2_PRESETS:
        return "gpt2", GPT2_PRESETS[name]
    if name in QWEN_PRESETS:
        return "qwen", QWEN_PRESETS[name]
    if name in DEEPSEEK_PRESETS:
        return "deepseek", DEEPSEEK_PRESETS[name]
    if name in TINY_PRESETS:
        return TINY_PRESETS[name]
    raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


@torch.no_grad()
def init_weights(model: CausalLM) -> None:
    """GPT-2 style init: N(0, 0.02) matrices (drawn in float32, one matrix at a time, then cast),
    zero biases, unit norms, zero buffers."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.copy_(torch.empty(param.shape, device=param.device).normal_(0.0, 0.02))
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
    for buffer in model.buffers():  # DeepSeek-V3's router bias
        buffer.zero_()


def _smollm2_tokenizer() -> "Tokenizer":
    """SmolLM2's vocabulary, read from the default model's GGUF."""
    import gguf

    from models.builtin import builtin_model_path
    from models.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(gguf.GGUFReader(builtin_model_path("smollm2-135m-instruct")))
