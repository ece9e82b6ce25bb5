"""Cut a loaded model into this rank's tensor-parallel slice, in place (Megatron-LM's split).

Every rank loads the whole checkpoint, then keeps its slice of each weight here (loading only the
slice would save the transient full copy; the checkpoint readers stay simple instead):

    attention   heads split: q rows, k/v rows by KV head (a KV head is copied to the ranks whose
                query heads use it when there are fewer KV heads than ranks), the output
                projection's input columns; the local head counts shrink to match
    MLA         q / q_b and kv_b rows by head, o_proj columns; the latent projection, its norm
                and so the latent KV cache stay whole on every rank
    dense MLP   gate/up (c_fc) rows, down (c_proj) columns
    MoE         routed experts split whole across ranks (each rank runs E/P experts for the
                tokens routed to them); the router stays whole; shared experts split like a
                dense MLP
    vocabulary  embedding and LM head rows, V padded to a multiple of P

A row-parallel projection's bias is kept on rank 0 only, so the all-reduce adds it once.

Legend: C channels, H heads, KVH KV heads, D head dim, I intermediate size, E experts, P ranks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.base import KVCacheSpec
from models.gpt2 import GPT2, MLP, CausalSelfAttention
from models.layers import GatedMLP
from models.mla import MLAttention
from models.moe import SparseMoE
from models.parallel import AllReduce, TensorParallel, VocabParallel, shard_rows
from models.qwen import Attention


def check_shardable(model: nn.Module, size: int) -> None:
    """Raise ValueError (one sentence) when `size` ranks cannot split this model evenly."""
    for attn in model.attention_layers():
        heads = attn.n_head if isinstance(attn, CausalSelfAttention) else attn.num_heads
        _divides(size, heads, "attention heads")
        if isinstance(attn, Attention):
            kv = attn.num_kv_heads
            if kv % size and size % kv:
                raise ValueError(f"tensor-parallel size {size} and {kv} KV heads: one must divide the other")
    for module in model.modules():
        if isinstance(module, GatedMLP):
            _divides(size, module.down_proj.in_features, "MLP intermediate size")
        elif isinstance(module, MLP):
            _divides(size, module.c_proj.in_features, "MLP intermediate size")
        elif isinstance(module, SparseMoE):
            _divides(size, module.experts.num_experts, "routed experts")


def local_kv_cache_spec(spec: KVCacheSpec, size: int) -> KVCacheSpec:
    """What one rank's pool holds per token: its share of the KV heads (at least one); MLA's
    single latent "head" is held whole by every rank."""
    if spec.num_pools == 1:
        return spec
    return KVCacheSpec(spec.num_layers, max(1, spec.num_kv_heads // size), spec.head_dim, spec.num_pools)


def shard_model(model: nn.Module, tp: TensorParallel) -> None:
    """Keep this rank's slice of every weight and point the collectives at the group."""
    if is_sharded(model):  # an earlier engine on this same model cut it: use the new group's channels
        if model.vocab_parallel.tp != tp:
            raise ValueError(f"the model is already split for {model.vocab_parallel.tp}; load it again for {tp}")
        _point_collectives(model, tp)
        return
    check_shardable(model, tp.size)
    _shard_vocab(model, tp)
    for attn in model.attention_layers():
        if isinstance(attn, CausalSelfAttention):
            _shard_gpt2_attention(attn, tp)
        elif isinstance(attn, MLAttention):
            _shard_mla(attn, tp)
        else:
            _shard_gqa(attn, tp)
    for module in list(model.modules()):
        if isinstance(module, MLP):
            _column(module.c_fc, tp)
            _row(module.c_proj, tp)
        elif isinstance(module, GatedMLP):
            _column(module.gate_up_proj, tp, parts=2)
            _row(module.down_proj, tp)
        elif isinstance(module, SparseMoE):
            _shard_experts(module, tp)
    _point_collectives(model, tp)


def is_sharded(model: nn.Module) -> bool:
    return model.vocab_parallel.tp is not None


def _point_collectives(model: nn.Module, tp: TensorParallel) -> None:
    model.vocab_parallel.tp = tp
    for module in model.modules():
        if isinstance(module, AllReduce):
            module.tp = tp


def _divides(size: int, count: int, what: str) -> None:
    if count % size:
        raise ValueError(f"tensor-parallel size {size} must divide the model's {count} {what}")


def _shard_vocab(model: nn.Module, tp: TensorParallel) -> None:
    embedding = model.transformer.wte if isinstance(model, GPT2) else model.model.embed_tokens
    vocab = embedding.num_embeddings
    padded = -(-vocab // tp.size) * tp.size
    tied = model.lm_head.weight is embedding.weight
    embedding.weight = _param(shard_rows(embedding.weight.detach(), tp, padded))
    embedding.num_embeddings = embedding.weight.shape[0]
    if tied:
        model.lm_head.weight = embedding.weight
    else:
        model.lm_head.weight = _param(shard_rows(model.lm_head.weight.detach(), tp, padded))
    model.lm_head.out_features = embedding.num_embeddings
    parallel: VocabParallel = model.vocab_parallel
    parallel.vocab_start, parallel.vocab_size = tp.rank * embedding.num_embeddings, vocab


def _shard_gpt2_attention(attn: CausalSelfAttention, tp: TensorParallel) -> None:
    _column(attn.c_attn, tp, parts=3)  # [q; k; v], each split by heads
    _row(attn.c_proj, tp)
    attn.n_head //= tp.size


def _shard_gqa(attn: Attention, tp: TensorParallel) -> None:
    H, KVH, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = _split_rows(attn.qkv_proj, [H * D, KVH * D, KVH * D])
    if KVH >= tp.size:
        k, v = shard_rows(k, tp), shard_rows(v, tp)
    else:  # fewer KV heads than ranks: each rank keeps the one KV head its query heads read
        head = tp.rank * (H // tp.size) // (H // KVH)
        k, v = k[head * D:(head + 1) * D], v[head * D:(head + 1) * D]
    _set_rows(attn.qkv_proj, torch.cat((shard_rows(q, tp), k, v)))
    _row(attn.o_proj, tp)
    attn.num_heads, attn.num_kv_heads = H // tp.size, max(1, KVH // tp.size)
    attn.sizes = [attn.num_heads * D, attn.num_kv_heads * D, attn.num_kv_heads * D]


def _shard_mla(attn: MLAttention, tp: TensorParallel) -> None:
    _column(attn.q_proj if hasattr(attn, "q_proj") else attn.q_b_proj, tp)  # rows grouped by head
    _column(attn.kv_b_proj, tp)
    _row(attn.o_proj, tp)
    attn.num_heads //= tp.size
    attn.w_uk = attn.w_uv_t = None  # re-split from the sharded kv_b_proj (prepare_absorbed)


def _shard_experts(moe: SparseMoE, tp: TensorParallel) -> None:
    experts = moe.experts
    start, end = tp.shard_range(experts.num_experts)
    experts.gate_up_proj = _param(experts.gate_up_proj.detach()[start:end])
    experts.down_proj = _param(experts.down_proj.detach()[start:end])
    experts.first_expert, experts.num_local_experts = start, end - start  # shared experts: a GatedMLP


def _column(linear: nn.Linear, tp: TensorParallel, parts: int = 1) -> None:
    """Column-parallel: this rank's output rows (of each of `parts` stacked equal blocks)."""
    blocks = _split_rows(linear, [linear.out_features // parts] * parts)
    _set_rows(linear, torch.cat([shard_rows(block, tp) for block in blocks]))


def _row(linear: nn.Linear, tp: TensorParallel) -> None:
    """Row-parallel: this rank's input columns; the bias only on rank 0 (summed in once)."""
    start, end = tp.shard_range(linear.in_features)
    linear.weight = _param(linear.weight.detach()[:, start:end])
    linear.in_features = end - start
    if linear.bias is not None and tp.rank != 0:
        linear.bias = _param(torch.zeros_like(linear.bias))


def _split_rows(linear: nn.Linear, sizes: list[int]) -> list[torch.Tensor]:
    """Weight rows (with the bias as one more column) split into blocks of `sizes` rows."""
    weight = linear.weight.detach()
    if linear.bias is not None:
        weight = torch.cat((weight, linear.bias.detach()[:, None]), dim=1)  # (R, K + 1)
    return list(weight.split(sizes))


def _set_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Install rows from `_split_rows` (bias column included) as the layer's weight and bias."""
    if linear.bias is not None:
        linear.bias = _param(rows[:, -1])
        rows = rows[:, :-1]
    linear.weight = _param(rows)
    linear.out_features = rows.shape[0]


def _param(tensor: torch.Tensor) -> nn.Parameter:
    """A compact copy, so the full weight it was sliced from can be freed."""
    return nn.Parameter(tensor.clone(memory_format=torch.contiguous_format), requires_grad=False)
