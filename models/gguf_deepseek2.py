"""llama.cpp `deepseek2` GGUF files (DeepSeek-V2/V3) -> DeepseekModel.

llama.cpp's converter writes MLA as multi-query attention over the latent: `key_length` is
kv_lora_rank + rope dim, the per-head sizes are in `key_length_mla` / `value_length_mla`, and
kv_b_proj is split in two for its absorbed kernels:
    attn_k_b (H, L, Dn)   = W_UK transposed per head
    attn_v_b (H, Dv, L)   = W_UV
(files converted before that split carry one `attn_kv_b`). Experts are stacked per layer
(`ffn_{gate,up,down}_exps`), the router is `ffn_gate_inp`, V3's selection bias `exp_probs_b`.
RoPE rows stay in the checkpoint's interleaved order, exactly as in the HF files, so the same
de-interleave applies (models/hf_checkpoint.py).
"""
from __future__ import annotations

import re

import torch

from models.deepseek import DeepseekConfig, DeepseekModel
from models.hf_checkpoint import deinterleave_rope_rows, hf_to_qwen_state_dict

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "exp_probs_b": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def deepseek2_config(meta, tensors: dict[str, torch.Tensor]) -> DeepseekConfig:
    """The model's shape and routing from `deepseek2.*` metadata (see the module docstring)."""
    rope_dim, latent = meta.require("rope.dimension_count"), meta.require("attention.kv_lora_rank")
    key_mla = meta.arch_get("attention.key_length_mla") or meta.require("attention.key_length")  # pre-split files
    sigmoid = meta.arch_get("expert_gating_func") == 2
    groups, groups_used = meta.arch_get("expert_group_count") or 1, meta.arch_get("expert_group_used_count") or 1
    scaling = None
    if meta.arch_get("rope.scaling.type") == "yarn":
        mscale = (meta.arch_get("rope.scaling.yarn_log_multiplier") or 0.0) / 0.1  # written as 0.1 * mscale_all_dim
        scaling = {"rope_type": "yarn", "factor": meta.arch_get("rope.scaling.factor"),
                   "original_max_position_embeddings": meta.arch_get("rope.scaling.original_context_length"),
                   "beta_fast": meta.arch_get("rope.scaling.yarn_beta_fast") or 32,
                   "beta_slow": meta.arch_get("rope.scaling.yarn_beta_slow") or 1,
                   "mscale": mscale, "mscale_all_dim": mscale}
    return DeepseekConfig(
        vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=meta.require("embedding_length"),
        intermediate_size=meta.require("feed_forward_length"),
        moe_intermediate_size=meta.require("expert_feed_forward_length"),
        num_hidden_layers=meta.require("block_count"), num_attention_heads=meta.require("attention.head_count"),
        q_lora_rank=meta.arch_get("attention.q_lora_rank") or None, kv_lora_rank=latent,
        qk_nope_head_dim=key_mla - rope_dim, qk_rope_head_dim=rope_dim,
        v_head_dim=meta.arch_get("attention.value_length_mla") or meta.require("attention.value_length"),
        n_routed_experts=meta.require("expert_count"), n_shared_experts=meta.arch_get("expert_shared_count", 0),
        num_experts_per_tok=meta.require("expert_used_count"),
        first_k_dense_replace=meta.arch_get("leading_dense_block_count", 0),
        scoring_func="sigmoid" if sigmoid else "softmax",
        topk_method="noaux_tc" if sigmoid else ("group_limited_greedy" if groups_used < groups else "greedy"),
        n_group=groups, topk_group=groups_used, norm_topk_prob=bool(meta.arch_get("expert_weights_norm", False)),
        routed_scaling_factor=meta.arch_get("expert_weights_scale", 1.0),
        max_position_embeddings=meta.require("context_length"), rope_theta=meta.arch_get("rope.freq_base", 10000.0),
        rope_scaling=scaling, rms_norm_eps=meta.arch_get("attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in tensors,
    )


def deepseek2_state_dict(tensors: dict[str, torch.Tensor], config: DeepseekConfig) -> dict[str, torch.Tensor]:
    """GGUF tensors -> HF names (kv_b re-joined, experts stacked [gate; up]), then the HF path's
    gate/up fusion and RoPE de-interleave."""
    out, parts = {}, {}
    for name, value in tensors.items():
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
        if not match:
            if name not in TOP_NAMES:
                raise ValueError(f"unexpected GGUF tensor {name}")
            out[TOP_NAMES[name]] = value
            continue
        layer, part, kind = match.groups()
        prefix = f"model.layers.{layer}"
        if part in ("attn_k_b", "attn_v_b", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            parts.setdefault(prefix, {})[part] = value
        elif part == "exp_probs_b":
            out[f"{prefix}.mlp.gate.e_score_correction_bias"] = value
        elif part in LAYER_NAMES:
            out[f"{prefix}.{LAYER_NAMES[part]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected GGUF tensor {name}")
    for prefix, p in parts.items():
        if "attn_k_b" in p:  # (H, L, Dn) and (H, Dv, L) -> kv_b_proj (H (Dn + Dv), L)
            w = torch.cat((p["attn_k_b"].transpose(1, 2), p["attn_v_b"]), dim=1)  # (H, Dn + Dv, L)
            out[f"{prefix}.self_attn.kv_b_proj.weight"] = w.reshape(-1, w.shape[-1])
        if "ffn_gate_exps" in p:  # (E, I, C) x 2 -> (E, 2I, C); down (E, C, I)
            out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat((p["ffn_gate_exps"], p["ffn_up_exps"]), dim=1)
            out[f"{prefix}.mlp.experts.down_proj"] = p["ffn_down_exps"]
    return deinterleave_rope_rows(hf_to_qwen_state_dict(out), config)


def build_deepseek2(meta, tensors: dict[str, torch.Tensor]) -> tuple[DeepseekModel, dict[str, torch.Tensor], int]:
    config = deepseek2_config(meta, tensors)
    with torch.device("meta"):
        model = DeepseekModel(config)
    return model, deepseek2_state_dict(tensors, config), config.max_position_embeddings
