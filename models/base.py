"""What every nanoserve model shares: the packed-batch forward contract and a naive decoder.

A model maps a packed batch `input_ids (N,)`, `positions (N,)` plus `AttentionMetadata` to
hidden states `(N, C)`; `compute_logits` turns only the rows that sample into `(M, V)` logits.
`generate` is the reference decoder the engine is tested against: a full forward over the
whole sequence for every new token, no cache, greedy by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.attention import AttentionMetadata, KVCache, build_attention_metadata


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the K/V a model stores per token: one (KVH, D) key and value per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * itemsize


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
        meta = build_attention_metadata([len(token_ids)], [len(token_ids)], None, 1)
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
