"""Qwen2 / Qwen2.5 / Qwen3 and Llama-style decoders in one implementation.

The families differ in three switches on one config: QKV bias (Qwen2/2.5), q/k RMSNorm per head
(Qwen3), and nothing at all (Llama, SmolLM2). All use RoPE, RMSNorm, SwiGLU and grouped-query
attention. Qwen3-MoE is Qwen3 with routed experts (models/moe.py) in place of the dense SwiGLU
in every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`. Names mirror the HF checkpoints (`model.layers.0.self_attn.o_proj`) except two fused
projections, made at load time: `qkv_proj` = [q; k; v] and `gate_up_proj` = [gate; up].

Legend: N tokens in the packed batch, C channels, H query heads, KVH KV heads, D head dim,
V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.attention import AttentionMetadata, PagedAttention
from models.base import KVCacheSpec, RotaryDecoderLM
from models.layers import GatedMLP, Linear, RMSNorm, RotaryTables
from models.moe import MoEConfig, SparseMoE


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int | None = None       # None: hidden_size // num_attention_heads (Qwen3 sets it)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    qkv_bias: bool = True             # Qwen2/2.5: bias on q, k, v only
    o_bias: bool = False              # Llama `attention_bias` puts a bias on o_proj too
    qk_norm: bool = False             # Qwen3: RMSNorm over each head of q and k before RoPE
    num_experts: int = 0              # Qwen3-MoE: routed experts (0: dense)
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, "heads must group evenly"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.num_experts > 0 and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                         intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob)

    @classmethod
    def from_hf(cls, hf: dict) -> "QwenConfig":
        """Read an HF config.json dict of model_type qwen2, qwen3, qwen3_moe or llama."""
        model_type = hf["model_type"]
        attention_bias = hf.get("attention_bias", False)
        moe = {}
        if model_type == "qwen3_moe":
            moe = dict(num_experts=hf.get("num_experts") or hf["num_local_experts"], num_experts_per_tok=hf["num_experts_per_tok"],
                       moe_intermediate_size=hf["moe_intermediate_size"],
                       norm_topk_prob=hf.get("norm_topk_prob", False),
                       decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                       mlp_only_layers=list(hf.get("mlp_only_layers") or []))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            rope_scaling=_rope_scaling(hf),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            **moe,
        )


def _rope_scaling(hf: dict) -> dict | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


# name -> shape of known checkpoints, with parameter counts (tied embeddings counted once)
QWEN_PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(  # 494M
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768),
    "qwen3-0.6b": dict(  # 596M
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, qkv_bias=False,
        qk_norm=True),
    # Qwen3-30B-A3B's layout (GQA 32:4 at head dim 128, 128 experts, 8 active) scaled to the
    # deepseek-v2-mid preset's size: 8 layers at hidden 1024, 64 experts of 256, 6 active
    "qwen3-moe-mid": dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, qkv_bias=False, qk_norm=True,
        tie_word_embeddings=False, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=256),
    "smollm2-135m": dict(  # 135M, Llama architecture
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, rms_norm_eps=1e-5, qkv_bias=False),
}


class Attention(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.paged_attn = PagedAttention(self.head_dim**-0.5)
        self.kv_cache = None

    def forward(self, x: torch.Tensor, rope: RotaryTables, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # (N, (H + 2 KVH) D)
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk = qkv[:, :(H + KVH) * D].view(-1, H + KVH, D)  # (N, H + KVH, D): q and k rotate together
        v = qkv[:, (H + KVH) * D:].view(-1, KVH, D)  # (N, KVH, D)
        if hasattr(self, "q_norm"):
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        qk = rope(qk)  # rotated to each token's position
        q, k = qk[:, :H], qk[:, H:]  # (N, H, D), (N, KVH, D)
        y = self.paged_attn(q, k, v, self.kv_cache, meta)  # (N, H, D)
        return self.o_proj(y.flatten(1))  # (N, H*D) -> (N, C)


class QwenModel(RotaryDecoderLM):
    """Qwen2/2.5/3(-MoE) and Llama-style causal LM."""

    def __init__(self, config: QwenConfig):
        super().__init__(config, lambda i: Attention(config), lambda i: _mlp(config, i), rope_dim=config.head_dim)

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)


def _mlp(config: QwenConfig, layer_idx: int) -> nn.Module:
    if config.is_moe_layer(layer_idx):
        return SparseMoE(config.hidden_size, config.moe_config())
    return GatedMLP(config.hidden_size, config.intermediate_size)
