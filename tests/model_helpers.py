"""Test helpers: drive a model through the paged KV cache the way the engine does."""
from __future__ import annotations

import random

import torch

from models.attention import build_attention_metadata
from models.base import CausalLM


def allocate_kv_pool(model: CausalLM, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, ...]]:
    weight = next(model.parameters())
    return model.kv_cache_spec.allocate(num_blocks, block_size, weight.dtype, weight.device)


@torch.inference_mode()
def cached_logits(model: CausalLM, prompt: list[int], continuation: list[int], block_size: int = 4,
                  chunk: int | None = None, seed: int = 0) -> torch.Tensor:
    """Logits (len(prompt) + len(continuation) - 1 ... ) computed incrementally through a pool.

    The prompt is prefilled in chunks of `chunk` tokens (all at once when None), then each
    continuation token is fed one at a time. Blocks are scattered (shuffled ids) to exercise
    the block table. Runs on the model's device. Returns logits for every position, (T, V).
    """
    device = next(model.parameters()).device
    tokens = prompt + continuation
    num_blocks = len(tokens) // block_size + 4
    block_table = list(range(num_blocks))
    random.Random(seed).shuffle(block_table)
    model.bind_kv_cache(allocate_kv_pool(model, num_blocks, block_size))
    steps, done = [], 0
    chunk = chunk or len(prompt)
    while done < len(prompt):
        steps.append(min(chunk, len(prompt) - done))
        done += steps[-1]
    steps += [1] * len(continuation)
    out, pos = [], 0
    for n in steps:
        meta = build_attention_metadata([n], [pos + n], [block_table], block_size, device)
        ids = torch.tensor(tokens[pos:pos + n], device=device)
        hidden = model(ids, torch.arange(pos, pos + n, device=device), meta)
        out.append(model.compute_logits(hidden).float())
        pos += n
    model.bind_kv_cache(None)
    return torch.cat(out)
