"""GPT-2, from scratch, nanoGPT style, over a packed batch and a paged KV cache.

Parameter names mirror the Hugging Face / nanoGPT checkpoints (`transformer.h.0.attn.c_attn`),
so loading is a copy plus the Conv1D transpose. Learned positions, pre-LayerNorm, GELU MLP,
LM head tied to the token embedding.

Legend: N tokens in the packed batch, C channels, H heads, D head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionMetadata, PagedAttention
from models.base import CausalLM, KVCacheSpec
from models.layers import Embedding, Linear, LMHead
from models.parallel import AllReduce, VocabParallel


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024      # context length (nanoGPT: block_size)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    bias: bool = True            # nanoGPT can train without biases in Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # HF GPT-2 uses the tanh approximation; nanoGPT uses exact "gelu"

    def __post_init__(self) -> None:
        assert self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"
        assert self.activation in ("gelu_new", "gelu"), f"unknown activation {self.activation}"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# name -> shape of the released checkpoints (parameter counts with the tied head counted once)
GPT2_PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.paged_attn = PagedAttention(self.head_dim**-0.5)
        self.kv_cache = None

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(-1, 3, self.n_head, self.head_dim).unbind(1)  # (N, 3C) -> 3 x (N, H, D)
        y = self.paged_attn(q, k, v, self.kv_cache, meta)  # (N, H, D)
        return self.c_proj(y.flatten(1))  # (N, C)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_new" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":
            return self.c_proj(self.c_fc.forward_gelu_tanh(x))  # fused into the matmul by a packed kernel
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MLP(config)
        self.reduce = AllReduce()  # tensor parallel: sums the ranks' partial outputs (models/parallel.py)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.reduce(self.attn(self.ln_1(x), meta))
        return x + self.reduce(self.mlp(self.ln_2(x)))


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.max_positions = config.n_positions
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = LMHead(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.vocab_parallel = VocabParallel()  # tensor parallel: each rank holds a slice of V

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.n_layer, self.config.n_head, self.config.head_dim)

    def attention_layers(self) -> list[nn.Module]:
        return [block.attn for block in self.transformer.h]

    def keep_first_layers(self, num_layers: int) -> None:
        """Drop every block after the first num_layers (a cheap draft model of the same family)."""
        self.transformer.h = self.transformer.h[:num_layers]
        self.config.n_layer = num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.vocab_parallel.embed(self.transformer.wte, input_ids) + self.transformer.wpe(positions)  # (N, C)
        for block in self.transformer.h:
            x = block(x, meta)
        return self.transformer.ln_f(x)  # (N, C)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab_parallel.gather_logits(self.lm_head(hidden))  # (M, C) -> (M, V) float32
