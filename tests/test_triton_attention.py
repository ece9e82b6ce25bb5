"""models/triton_attention.py against plain PyTorch: store_kv, and unified_attention on mixed batches.

Without a GPU the kernels run under the Triton interpreter. Triton reads TRITON_INTERPRET when a
kernel is decorated, i.e. when models.triton_attention is first imported, so it is set here, before
that import (no other module imports it; test_kernels_are_interpreted_on_cpu checks it took).
The interpreter runs each program in Python, so the batches are small. Triton is a dependency
of the test run (the `gpu` extra): a missing triton fails here, it is not skipped.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from models.triton_attention import _unified_attention_kernel, store_kv, unified_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol): the output is rounded to its dtype, an error relative to its size (bf16: 2^-9)
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}

# (cached prefix, new tokens) per sequence: decodes of different lengths, a verification chunk
# of 3, prefill chunks with and without a cached prefix. The chunks span several query blocks, and
# with 4 heads per KV head (4 queries a block) the 20-token chunk's first block ends on a page's
# first key (position 32): a tile that stopped one key short would drop it.
MIXED_BATCH = [(0, 1), (16, 1), (39, 1), (20, 3), (29, 20), (0, 9), (45, 40)]


def test_kernels_are_interpreted_on_cpu():
    assert torch.cuda.is_available() or type(_unified_attention_kernel).__name__ == "InterpretedFunction"


def make_pools(num_blocks, block_size, num_kv_heads, head_dim, dtype):
    """NaN-filled pools: a kernel that reads a row it should not turns its output into NaN."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (torch.full(shape, float("nan"), dtype=dtype, device=DEVICE),
            torch.full(shape, float("nan"), dtype=dtype, device=DEVICE))


def shuffled_block_tables(seq_lens, block_size, num_blocks, gen):
    """(S, max_blocks) int32: each sequence gets distinct random blocks, padded with 0."""
    needed = [-(-n // block_size) for n in seq_lens]
    blocks = torch.randperm(num_blocks, generator=gen)[:sum(needed)].split(needed)
    table = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32)
    for s, ids in enumerate(blocks):
        table[s, :len(ids)] = ids
    return table


def slots_of(table, positions, block_size):
    """slot of each position of one sequence: block_table[p // BS] * BS + p % BS."""
    return table[positions // block_size].long() * block_size + positions % block_size  # (T,)


def reference_attention(q, keys, values, query_lens, scale):
    """Per sequence, in float32: queries at the end of the context attend causally to keys (L, KVH, D)."""
    outs, start = [], 0
    for q_len, k, v in zip(query_lens, keys, values):
        group = q.shape[1] // k.shape[1]
        qs = q[start:start + q_len].float().transpose(0, 1)           # (H, T, D)
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        q_pos = torch.arange(k.shape[1] - q_len, k.shape[1], device=q.device)  # (T,)
        mask = torch.arange(k.shape[1], device=q.device)[None, :] <= q_pos[:, None]  # (T, L)
        scores = (qs @ k.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))  # (H, T, L)
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))  # (T, H, D)
        start += q_len
    return torch.cat(outs)  # (N, H, D)


def run_mixed_batch(batch, dtype, block_size, num_heads, num_kv_heads, head_dim):
    """Store every sequence's K/V with store_kv (prefix and new tokens, padded slots between), attend, compare."""
    gen = torch.Generator().manual_seed(block_size * 1000 + head_dim + num_heads)
    seq_lens = [prefix + new for prefix, new in batch]
    query_lens = [new for _, new in batch]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3  # a few blocks nobody owns
    k_pool, v_pool = make_pools(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    tables = shuffled_block_tables(seq_lens, block_size, num_blocks, gen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    keys = [randn(n, num_kv_heads, head_dim) for n in seq_lens]    # (L, KVH, D) each
    values = [randn(n, num_kv_heads, head_dim) for n in seq_lens]  # (L, KVH, D) each
    slots = [slots_of(tables[s], torch.arange(n), block_size) for s, n in enumerate(seq_lens)]
    padding = torch.full((2,), -1)
    slot_mapping = torch.cat([torch.cat([sl, padding]) for sl in slots]).to(DEVICE)  # (sum(L) + 2S,)
    store_kv(torch.cat([torch.cat([k, randn(2, num_kv_heads, head_dim)]) for k in keys]),
             torch.cat([torch.cat([v, randn(2, num_kv_heads, head_dim)]) for v in values]),
             k_pool, v_pool, slot_mapping)

    q = randn(sum(query_lens), num_heads, head_dim)  # (N, H, D)
    query_start_loc = torch.tensor([0] + query_lens).cumsum(0).to(DEVICE)  # (S+1,) int64
    scale = head_dim ** -0.5
    out = unified_attention(q, k_pool, v_pool, tables.to(DEVICE), query_start_loc,
                            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale)
    expected = reference_attention(q, keys, values, query_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    return (out.float() - expected).abs().max().item()


@pytest.mark.parametrize("dtype, block_size, num_heads, num_kv_heads, head_dim", [
    (torch.float32, 16, 8, 2, 64),     # GQA, 4 heads per KV head
    (torch.float32, 32, 2, 2, 128),    # MHA
    (torch.float16, 16, 2, 2, 64),
    (torch.float16, 32, 8, 2, 128),
    (torch.bfloat16, 16, 8, 2, 64),
    (torch.float32, 16, 6, 2, 80),     # 3 heads per KV head, a head dim padded to 128
    (torch.float16, 16, 16, 1, 64),    # 16 heads per KV head: one query token per tile
])
def test_unified_attention_mixed_batch(dtype, block_size, num_heads, num_kv_heads, head_dim):
    run_mixed_batch(MIXED_BATCH, dtype, block_size, num_heads, num_kv_heads, head_dim)


def test_unified_attention_decodes_only_into_out():
    """A decode-only batch (one query block per sequence) into a caller's buffer; int64 block tables."""
    gen = torch.Generator().manual_seed(1)
    k_pool = torch.randn(8, 16, 1, 64, generator=gen)  # (NB, BS, KVH, D)
    v_pool = torch.randn(8, 16, 1, 64, generator=gen)
    tables = torch.tensor([[5, 2], [7, 0], [1, 3]])  # (S, 2)
    seq_lens = [20, 3, 32]
    q = torch.randn(3, 4, 64, generator=gen)  # (N, H, D)
    k_pool, v_pool, tables, q = (t.to(DEVICE) for t in (k_pool, v_pool, tables, q))
    out = torch.empty_like(q)
    result = unified_attention(q, k_pool, v_pool, tables, torch.arange(4, device=DEVICE),
                               torch.tensor(seq_lens, device=DEVICE), 0.125, out=out)
    keys = [k_pool[t].flatten(0, 1)[:n] for t, n in zip(tables, seq_lens)]  # (L, KVH, D) each
    values = [v_pool[t].flatten(0, 1)[:n] for t, n in zip(tables, seq_lens)]
    assert result is out
    torch.testing.assert_close(out, reference_attention(q, keys, values, [1, 1, 1], 0.125), atol=1e-4, rtol=0)


def test_store_kv_writes_exactly_the_given_slots():
    gen = torch.Generator().manual_seed(2)
    k_pool = torch.randn(4, 16, 2, 64, generator=gen).half()  # (NB, BS, KVH, D)
    v_pool = torch.randn(4, 16, 2, 64, generator=gen).half()
    k_before, v_before = k_pool.clone(), v_pool.clone()
    slot_mapping = torch.tensor([37, -1, 5, 63, -1, 16])  # (N,) two padded tokens
    k = torch.randn(6, 2, 64, generator=gen)  # (N, KVH, D) float32, cast to the pools' float16
    v = torch.randn(6, 3, 2, 64, generator=gen).to(DEVICE)[:, 1]  # (N, KVH, D) strided, as a slice of fused qkv is
    k_pool, v_pool, k_before, v_before, slot_mapping, k = (t.to(DEVICE) for t in (k_pool, v_pool, k_before, v_before,
                                                                                  slot_mapping, k))
    store_kv(k, v, k_pool, v_pool, slot_mapping)

    written = slot_mapping >= 0
    k_expected, v_expected = k_before.flatten(0, 1).clone(), v_before.flatten(0, 1).clone()  # (NB*BS, KVH, D)
    k_expected[slot_mapping[written]] = k[written].half()
    v_expected[slot_mapping[written]] = v[written].half()
    assert torch.equal(k_pool.flatten(0, 1), k_expected) and torch.equal(v_pool.flatten(0, 1), v_expected)
    assert not torch.equal(k_pool, k_before)


def test_int8_pools_are_refused():
    pool = torch.zeros(2, 16, 1, 68, dtype=torch.int8)
    with pytest.raises(AssertionError, match="int8"):
        unified_attention(torch.zeros(1, 1, 64), pool, pool, torch.zeros(1, 1, dtype=torch.int32),
                          torch.tensor([0, 1]), torch.tensor([1]), 0.125)
