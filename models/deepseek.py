"""DeepSeek-V2 / V3: Multi-head Latent Attention (models/mla.py) and Mixture-of-Experts
feed-forwards (models/moe.py) in an otherwise Llama-like pre-norm decoder.

    x = x + MLA(RMSNorm(x))
    x = x + FFN(RMSNorm(x))     FFN: dense SwiGLU in the first `first_k_dense_replace` layers,
                                routed + shared experts after

V2 and V3 differ only in routing: V2 takes softmax scores (optionally group-limited by each
group's best expert), V3 sigmoid scores with a selection-only bias, groups ranked by their two
best experts, renormalized and scaled weights. Both checkpoints lay the RoPE dims of q and k out
in interleaved pairs; the loader permutes those weight rows once to the "rotate half" order our
RoPE uses (models/hf_checkpoint.py), which leaves every q.k product unchanged.

Legend: N tokens in the packed batch, C channels, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from models.base import KVCacheSpec, RotaryDecoderLM
from models.layers import GatedMLP, yarn_get_mscale
from models.mla import MLA_MODES, MLAttention
from models.moe import MoEConfig, SparseMoE


@dataclass
class DeepseekConfig:
    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944          # dense layers' SwiGLU width
    moe_intermediate_size: int = 1408       # each expert's width
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    q_lora_rank: int | None = None          # None: q = q_proj(x) (V2-Lite); else a low-rank q
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    scoring_func: str = "softmax"           # V2 softmax, V3 sigmoid
    topk_method: str = "greedy"             # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    def moe_config(self) -> MoEConfig:
        grouped = self.topk_method in ("group_limited_greedy", "noaux_tc")
        return MoEConfig(
            num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok,
            intermediate_size=self.moe_intermediate_size, scoring=self.scoring_func,
            num_groups=self.n_group if grouped else 1, topk_groups=self.topk_group if grouped else 1,
            group_score="top2_sum" if self.topk_method == "noaux_tc" else "max",
            correction_bias=self.topk_method == "noaux_tc", norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor, num_shared_experts=self.n_shared_experts)

    @property
    def softmax_scale(self) -> float:
        """(Dn + R)^-1/2, times YaRN's mscale(mscale_all_dim)^2 when the config extends RoPE."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        s = self.rope_scaling or {}
        if s.get("mscale_all_dim"):
            scale *= yarn_get_mscale(s["factor"], s["mscale_all_dim"]) ** 2
        return scale

    @classmethod
    def from_hf(cls, hf: dict) -> "DeepseekConfig":
        """Read an HF config.json dict of model_type deepseek_v2 or deepseek_v3."""
        v3 = hf["model_type"] == "deepseek_v3"
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            moe_intermediate_size=hf["moe_intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"], q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
            n_routed_experts=hf.get("n_routed_experts") or hf["num_local_experts"], n_shared_experts=hf.get("n_shared_experts") or 0,
            num_experts_per_tok=hf["num_experts_per_tok"], first_k_dense_replace=hf.get("first_k_dense_replace", 0),
            scoring_func="sigmoid" if v3 else hf.get("scoring_func", "softmax"),
            topk_method="noaux_tc" if v3 else hf.get("topk_method") or "greedy",
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            norm_topk_prob=hf.get("norm_topk_prob", v3),  # V2 configs ship False (transformers' V2 ignores it)
            routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=hf.get("rope_theta") or scaling.get("rope_theta", 10000.0),
            rope_scaling=None if rope_type == "default" else scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False))


DEEPSEEK_PRESETS: dict[str, dict] = {
    # DeepSeek-V2-Lite's attention (no q LoRA, 16 heads, latent 512 + RoPE 64) at hidden 1024, in
    # 8 layers of 64 routed experts (6 active) plus 2 shared: ~740M parameters, ~175M active/token
    "deepseek-v2-mid": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=16, kv_lora_rank=512, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1),
}


class DeepseekModel(RotaryDecoderLM):
    """DeepSeek-V2/V3 causal LM over a paged cache of MLA latents."""

    def __init__(self, config: DeepseekConfig):
        super().__init__(config, lambda i: _attention(config), lambda i: _mlp(config, i), rope_dim=config.qk_rope_head_dim)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        """One pool of latents: (1, kv_lora_rank + rope dim) per token and layer."""
        c = self.config
        return KVCacheSpec(c.num_hidden_layers, 1, c.kv_lora_rank + c.qk_rope_head_dim, num_pools=1)

    def set_mla_mode(self, mode: str) -> None:
        """`absorbed` (default) or `naive` decode attention; call before the linears are packed."""
        if mode not in MLA_MODES:
            raise ValueError(f"unknown MLA mode {mode!r}; use {' or '.join(MLA_MODES)}")
        for attn in self.attention_layers():
            attn.mode = mode
            if mode == "absorbed":
                attn.prepare_absorbed()


def _attention(c: DeepseekConfig) -> MLAttention:
    return MLAttention(c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                       c.qk_rope_head_dim, c.v_head_dim, c.softmax_scale, c.attention_bias, c.rms_norm_eps)


def _mlp(c: DeepseekConfig, layer_idx: int) -> nn.Module:
    """Dense SwiGLU in the first `first_k_dense_replace` layers, routed + shared experts after."""
    if layer_idx < c.first_k_dense_replace:
        return GatedMLP(c.hidden_size, c.intermediate_size)
    return SparseMoE(c.hidden_size, c.moe_config())
