"""What every nanoserve model shares: the packed-batch forward contract and a naive decoder.

A model maps a packed batch `input_ids (N,)`, `positions (N,)` plus `AttentionMetadata` to
hidden states `(N, C)`; `compute_logits` turns only the rows that sample into `(M, V)` logits.
`generate` is the reference decoder the engine is tested against: a full forward over the
whole sequence for every new token, no cache, greedy by default.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.attention import AttentionMetadata, KVCache, build_attention_metadata
from models.kv_int8 import row_width
from models.layers import Embedding, Linear, LMHead, PreNormBlock, RMSNorm, RotaryEmbedding
from models.parallel import VocabParallel


@dataclass(frozen=True)
class KVCacheSpec:
    """What a model stores per token and layer: `num_pools` tensors of (KVH, D) each.

    MHA/GQA keep a key pool and a value pool (num_pools 2). MLA keeps one pool of latents,
    (1, kv_lora_rank + rope_dim) per token, from which keys and values are both derived.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pools: int = 2

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one block across layers and pools; an int8 pool's rows carry a 4-byte scale."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_pools * self.num_layers * block_size * self.num_kv_heads * row_width(self.head_dim, dtype) * itemsize

    def allocate(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[KVCache]:
        """Zeroed pools, one tuple of `num_pools` (NB, BS, KVH, D) tensors per layer; (NB, BS, KVH, D + 4)
        rows of int8 values and their scale when dtype is int8 (models/kv_int8.py)."""
        shape = (num_blocks, block_size, self.num_kv_heads, row_width(self.head_dim, dtype))
        return [tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_pools))
                for _ in range(self.num_layers)]

    def describe(self, dtype: torch.dtype) -> str:
        """The per-token formula a learner can check, e.g. `2 (K,V) x 12 layers x 12 heads x 64 x 2 B`."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        what = "K,V" if self.num_pools == 2 else "latent"
        width = f"({self.head_dim} + 4 scale)" if dtype == torch.int8 else str(self.head_dim)
        return (f"{self.bytes_per_block(1, dtype)} bytes/token = {self.num_pools} ({what}) x {self.num_layers} layers"
                f" x {self.num_kv_heads} heads x {width} x {itemsize} B")


class CausalLM(nn.Module):
    """Base class: subclasses define `forward`, `compute_logits`, `attention_layers`, `kv_cache_spec`."""

    max_positions: int

    @property
    def kv_cache_spec(self) -> KVCacheSpec:
        raise NotImplementedError

    def attention_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def keep_first_layers(self, num_layers: int) -> None:
        """Truncate to the first num_layers layers (the embedding, final norm and head stay)."""
        raise NotImplementedError

    def bind_kv_cache(self, kv_caches: list[KVCache] | None) -> None:
        """Give each attention layer its (k, v) pool, or None for the cache-free path."""
        layers = self.attention_layers()
        for i, layer in enumerate(layers):
            layer.kv_cache = None if kv_caches is None else kv_caches[i]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def full_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) for every position of one sequence, no cache."""
        device = next(self.parameters()).device
        ids = torch.tensor(token_ids, device=device)  # (T,)
        meta = build_attention_metadata([len(token_ids)], [len(token_ids)], None, 1, device)
        bound = [layer.kv_cache for layer in self.attention_layers()]
        self.bind_kv_cache(None)  # the reference path never touches a pool an engine may own
        try:
            hidden = self(ids, torch.arange(len(token_ids), device=device), meta)  # (T, C)
        finally:
            self.bind_kv_cache(None if bound[0] is None else bound)
        return self.compute_logits(hidden).float()  # (T, V)

    @torch.inference_mode()
    def generate(self, token_ids: list[int], max_new_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> list[int]:
        """Naive greedy reference: a full forward over the whole sequence per new token."""
        tokens = list(token_ids)
        for _ in range(max_new_tokens):
            next_id = int(self.full_logits(tokens)[-1].argmax())
            tokens.append(next_id)
            if next_id in stop_token_ids:
                break
        return tokens[len(token_ids):]


class RotaryDecoderLM(CausalLM):
    """The skeleton Qwen/Llama and DeepSeek share: token embedding, decoder layers that take one
    rotary table per step, final RMSNorm, LM head (tied to the embedding when the config says so).
    Parameter names follow the HF checkpoints (`model.layers.0...`, `lm_head`).
    """

    def __init__(self, config, attention: Callable[[int], nn.Module], mlp: Callable[[int], nn.Module], rope_dim: int):
        """attention(i) and mlp(i) build layer i's two sublayers; rope_dim is the rotated width."""
        super().__init__()
        self.config = config
        self.max_positions = config.max_position_embeddings
        layers = [PreNormBlock(config.hidden_size, config.rms_norm_eps, attention(i), mlp(i))
                  for i in range(config.num_hidden_layers)]
        self.model = nn.ModuleDict(dict(
            embed_tokens=Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(layers),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.rotary = RotaryEmbedding(rope_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vocab_parallel = VocabParallel()  # tensor parallel: each rank holds a slice of V

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

    def keep_first_layers(self, num_layers: int) -> None:
        """Drop every layer after the first num_layers (a cheap draft model of the same family)."""
        self.model.layers = self.model.layers[:num_layers]
        self.config.num_hidden_layers = num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.vocab_parallel.embed(self.model.embed_tokens, input_ids)  # (N, C)
        rope = self.rotary.tables(positions)  # this step's cos and signed sin, (N, 1, D), shared by every layer
        for layer in self.model.layers:
            x = layer(x, rope, meta)
        return self.model.norm(x)  # (N, C)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vocab_parallel.gather_logits(self.lm_head(hidden))  # (M, C) -> (M, V) float32

