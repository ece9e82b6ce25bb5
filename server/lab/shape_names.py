"""Name tensor dimensions with the shape letters of the model files, from the model's config.

`(7, 3, 16)` in a Qwen trace reads `(N=7, KVH=3, D=16)`: N tokens in the step's packed batch,
S sampling rows, C channels, H / KVH query / key-value heads, D head dim, I MLP width, V vocab,
NB / BS blocks and block size of the paged pool; MLA adds L (latent), R (RoPE dim), Dn, Dv,
Q (q LoRA rank); MoE adds E experts, K experts per token, Ie one expert's width. Composite widths
such as `3C` or `(H+2KVH)*D` name fused projections. When two names have the same size the
first in `dimension_names`' order wins, so the tiny test configs keep their sizes distinct.
"""
from __future__ import annotations

from models.deepseek import DeepseekConfig
from models.gpt2 import GPT2Config
from models.qwen import QwenConfig


def dimension_names(config) -> list[tuple[str, int]]:
    """(letter, size) pairs for a model config, most specific first."""
    if isinstance(config, GPT2Config):
        C, H = config.n_embd, config.n_head
        return [("C", C), ("3C", 3 * C), ("4C", 4 * C), ("H", H), ("D", C // H), ("V", config.vocab_size)]
    if isinstance(config, QwenConfig):
        C, H, KVH, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        names = [("C", C), ("V", config.vocab_size), ("(H+2KVH)*D", (H + 2 * KVH) * D), ("H*D", H * D),
                 ("KVH*D", KVH * D), ("(H+KVH)", H + KVH), ("H", H), ("KVH", KVH), ("D", D),
                 ("2I", 2 * config.intermediate_size), ("I", config.intermediate_size)]
        if config.num_experts:
            names += _moe_names(config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size, 0)
        return names
    if isinstance(config, DeepseekConfig):
        C, H, L, R = config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_rope_head_dim
        Dn, Dv = config.qk_nope_head_dim, config.v_head_dim
        names = [("C", C), ("V", config.vocab_size), ("L+R", L + R), ("L", L), ("R", R),
                 ("H*(Dn+R)", H * (Dn + R)), ("H*(Dn+Dv)", H * (Dn + Dv)), ("H*Dv", H * Dv), ("Dn+R", Dn + R),
                 ("Dn+Dv", Dn + Dv), ("H", H), ("Dn", Dn), ("Dv", Dv),
                 ("2I", 2 * config.intermediate_size), ("I", config.intermediate_size)]
        if config.q_lora_rank:
            names.append(("Q", config.q_lora_rank))
        return names + _moe_names(config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                                  config.n_shared_experts)
    return []


def _moe_names(experts: int, top_k: int, width: int, shared: int) -> list[tuple[str, int]]:
    names = [("E", experts), ("K", top_k), ("2Ie", 2 * width), ("Ie", width)]
    if shared:
        names += [("2Is", 2 * width * shared), ("Is", width * shared)]  # the shared experts' one SwiGLU
    return names


def name_dims(shape: tuple[int, ...], names: list[tuple[str, int]], leading: list[tuple[str, int]]) -> list[str]:
    """Each dimension's letter (`"N"`, `"C"`, ...) or its bare size when nothing matches.

    leading: this step's row counts (N tokens, S sampling rows, NB pool blocks), matched against
    the first dimension only, before the model's names.
    """
    return [next((letter for letter, value in (leading + names if i == 0 else names) if value == size), str(size))
            for i, size in enumerate(shape)]


def format_shape(shape: tuple[int, ...], letters: list[str]) -> str:
    """`(N=7, H=4, D=16)`; a dimension without a letter shows its size alone."""
    parts = [f"{letter}={size}" if letter != str(size) else str(size) for letter, size in zip(letters, shape)]
    return "(" + ", ".join(parts) + ")"
