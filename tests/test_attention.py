"""Paged attention equals dense causal attention for mixed prefill/decode batches."""
from __future__ import annotations

import os
import random

import pytest
import torch

from models.attention import build_attention_metadata, paged_attention, write_kv
from models.cpu_kernels import can_build
from models.kv_int8 import quantize_rows

H, KVH, D, BS = 4, 2, 8, 4

DECODE_PATHS = ["avx512", "avx2", "portable"]  # the C++ decode kernel's paths, best first


def decode_path_or_skip(path: str) -> str:
    """`path` when the decode kernel built it on this CPU, else skip (AVX-512 on an AVX2 CPU)."""
    from models.fused_attention import decode_kernel

    kernel = decode_kernel()
    if kernel is None:
        assert not can_build(), "the fused kernel should build here: see tests/test_cpu_kernels.py"
        pytest.skip("no compiler or ninja here: only the PyTorch path runs")
    if path not in kernel.paths():
        pytest.skip(f"this CPU has no {path} path (built: {kernel.paths()})")
    return path


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: one sequence, queries at the end of k/v. q (T, H, D), k/v (L, KVH, D)."""
    num_q, num_k = q.shape[0], k.shape[0]
    k = k.repeat_interleave(H // KVH, dim=1)  # (L, H, D)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * scale  # (H, T, L)
    q_pos = torch.arange(num_k - num_q, num_k)[:, None]
    scores = scores.masked_fill(torch.arange(num_k)[None, :] > q_pos, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)  # (T, H, D)


def test_the_decode_kernel_takes_the_simd_path_this_cpu_has():
    """A CPU with AVX2 + FMA + F16C builds the AVX2 path and GPT-2's head dim takes it (or the
    AVX-512 one); head dims without a specialization take the portable path. Without this, a
    routing slip would quietly test and run the portable path everywhere."""
    from models.fused_attention import decode_kernel

    decode_path_or_skip("portable")
    kernel = decode_kernel()
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if {"avx2", "fma", "f16c"} <= flags:
        assert "avx2" in kernel.paths()
        assert kernel.path_for(64, "avx2") == "avx2" and kernel.path_for(16, "avx2") == "avx2"
        assert kernel.path_for(64) == ("avx512" if "avx512f" in flags else "avx2")
    assert kernel.paths()[-1] == "portable"
    for head_dim in (8, 48, 512):
        assert kernel.path_for(head_dim) == "portable"
    assert kernel.path_for(64, "portable") == "portable"
    with pytest.raises(RuntimeError, match="unknown decode path"):
        kernel.path_for(64, "sse")


@pytest.mark.parametrize("seed", range(4))
def test_mixed_batch_matches_dense(seed):
    """Decodes, a fresh prefill and a prefill chunk over a cached prefix, in one call."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    # (cached prefix length, new tokens) per sequence; decodes (1 new token) first
    shapes = [(rng.randint(1, 20), 1) for _ in range(3)] + [(0, rng.randint(2, 9)), (rng.randint(1, 12), rng.randint(2, 7))]
    num_blocks = 64
    pool = (torch.zeros(num_blocks, BS, KVH, D), torch.zeros(num_blocks, BS, KVH, D))
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, full_k, full_v, qs = [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BS))]
        k, v = torch.randn(total, KVH, D, generator=gen), torch.randn(total, KVH, D, generator=gen)
        prefix_slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(cached)], dtype=torch.long)
        write_kv(k[:cached], v[:cached], pool, prefix_slots)  # the cached prefix, as an earlier step left it
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(new, H, D, generator=gen))
    meta = build_attention_metadata([n for _, n in shapes], [c + n for c, n in shapes], tables, BS)
    q = torch.cat(qs)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    out = paged_attention(q, new_k, new_v, pool, meta, D**-0.5)
    expected = torch.cat([dense_attention(qi, k, v, D**-0.5) for qi, k, v in zip(qs, full_k, full_v)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cache_free_path_is_causal_per_sequence():
    gen = torch.Generator().manual_seed(0)
    lens = [5, 3]
    q, k, v = (torch.randn(8, H, D, generator=gen), torch.randn(8, KVH, D, generator=gen), torch.randn(8, KVH, D, generator=gen))
    meta = build_attention_metadata(lens, lens, None, BS)
    out = paged_attention(q, k, v, None, meta, D**-0.5)
    expected = torch.cat([dense_attention(q[:5], k[:5], v[:5], D**-0.5), dense_attention(q[5:], k[5:], v[5:], D**-0.5)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not can_build(), reason="no compiler or ninja here: the fused kernel cannot build")
@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("kv_heads, q_heads", [(KVH, H), (H, H), (12, 12), (6, 12)])
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_the_decode_kernel_does_not_depend_on_the_batch_or_the_threads(pool_dtype, kv_heads, q_heads, path):
    """Long and short sequences match the PyTorch path, and each sequence's output is bit for
    bit the same alone (min(KVH, 2 x threads) slices of adjacent KV heads: on 2 threads three
    heads a slice at 12, uneven 1-2-1-2 slices of GQA pairs at 6), in a batch (whole sequences on
    up to 3 threads), and on one thread: greedy output must not depend on what else runs. Queries
    read in place out of a fused QKV output give the same bits as a packed copy."""
    from models.fused_attention import fused_decode_attention

    decode_path_or_skip(path)
    gen, rng = torch.Generator().manual_seed(5), random.Random(5)
    head_dim, block_size = 64, 16
    lens = [600, 129, 7, 256, 300, 128, 1]
    free = list(range(160))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    rows = [torch.randn(160, block_size, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2)]
    pool = tuple(quantize_rows(r) if pool_dtype == torch.int8 else r for r in rows)
    q = (3 * torch.randn(len(lens), q_heads, head_dim, generator=gen)).bfloat16()
    meta = build_attention_metadata([1] * len(lens), lens, tables, block_size)
    batched = fused_decode_attention(q, pool, meta.decode_block_tables, meta.decode_seq_lens, head_dim**-0.5, path)
    nothing = torch.empty(0, kv_heads, head_dim).bfloat16()  # no new token: attend what the pools hold
    reference = paged_attention(q, nothing, nothing, pool, _without_store(meta), head_dim**-0.5)
    torch.testing.assert_close(batched, reference, atol=2e-2, rtol=2e-2)
    fused_qkv = torch.cat([q, torch.randn(len(lens), 2 * kv_heads, head_dim, generator=gen).bfloat16()], dim=1)
    in_place = fused_qkv[:, :q_heads]  # q as a view of a fused QKV output: rows (q_heads + 2 KVH) D apart
    assert not in_place.is_contiguous()
    assert torch.equal(fused_decode_attention(in_place, pool, meta.decode_block_tables, meta.decode_seq_lens,
                                              head_dim**-0.5, path), batched)
    threads = torch.get_num_threads()
    try:
        for num_threads in sorted({1, threads}):
            torch.set_num_threads(num_threads)
            for s, n in enumerate(lens):
                alone = build_attention_metadata([1], [n], [tables[s]], block_size)
                out = fused_decode_attention(q[s:s + 1], pool, alone.decode_block_tables, alone.decode_seq_lens, head_dim**-0.5,
                                             path)
                assert torch.equal(out[0], batched[s]), (num_threads, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not can_build(), reason="no compiler or ninja here: the fused kernel cannot build")
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_the_decode_kernel_takes_an_empty_batch_and_refuses_tables_of_another_batch(path):
    """No sequence: an empty (0, H, D) output (the SIMD paths' work split divided by S and killed
    the process with SIGFPE). Tables or lengths for another number of sequences: an error, not a
    read past their end."""
    from models.fused_attention import fused_decode_attention

    decode_path_or_skip(path)
    pool = tuple(torch.randn(4, BS, KVH, 64).bfloat16() for _ in range(2))
    empty = fused_decode_attention(torch.randn(0, H, 64).bfloat16(), pool, torch.zeros(0, 1, dtype=torch.int64),
                                   torch.zeros(0, dtype=torch.int64), 0.125, path)
    assert empty.shape == (0, H, 64)
    q = torch.randn(2, H, 64).bfloat16()
    with pytest.raises(RuntimeError, match="block_tables"):
        fused_decode_attention(q, pool, torch.zeros(1, 1, dtype=torch.int64), torch.ones(2, dtype=torch.int64), 0.125, path)
    with pytest.raises(RuntimeError, match="seq_lens"):
        fused_decode_attention(q, pool, torch.zeros(2, 1, dtype=torch.int64), torch.ones(3, dtype=torch.int64), 0.125, path)


def _without_store(meta):
    """meta for attending what the pools hold, writing nothing (no slot for a new token)."""
    meta.slot_mapping = meta.slot_mapping[:0]
    return meta


@pytest.mark.skipif(not can_build(), reason="no compiler or ninja here: the fused kernel cannot build")
@pytest.mark.parametrize("pool_dtype", ["model", torch.int8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query_lens", [[1], [1] * 5, [1, 1, 6]])  # batch 1, plain decodes, a mixed step
def test_the_cpu_attention_stores_and_attends_as_the_torch_path(pool_dtype, dtype, query_lens):
    """models/kernels.py's CPU attention (one C++ call for a decode-only step, a C++ store for
    the rest) writes the pools byte for byte as the PyTorch path and returns its output, for
    keys and values that are strided views of one fused QKV projection."""
    from models.fused_attention import cpu_paged_attention, decode_kernel

    assert decode_kernel() is not None
    gen, rng = torch.Generator().manual_seed(len(query_lens)), random.Random(3)
    head_dim, block_size = 64, 16
    cached = [rng.randint(0, 40) for _ in query_lens]
    lens = [c + n for c, n in zip(cached, query_lens)]
    free = list(range(64))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    pool_type = dtype if pool_dtype == "model" else torch.int8
    rows = [torch.randn(64, block_size, KVH, head_dim, generator=gen).to(dtype) for _ in range(2)]
    start = tuple(quantize_rows(r) if pool_type == torch.int8 else r for r in rows)  # the cached keys and values
    qkv = torch.randn(sum(query_lens), (H + 2 * KVH) * head_dim, generator=gen).to(dtype)  # (N, (H + 2 KVH) D)
    q, k, v = qkv.split([H * head_dim, KVH * head_dim, KVH * head_dim], dim=-1)
    q, k, v = q.view(-1, H, head_dim), k.view(-1, KVH, head_dim), v.view(-1, KVH, head_dim)  # strided rows
    pools = {}
    outputs = {}
    for path, attend in [("torch", paged_attention), ("cpu", cpu_paged_attention)]:
        pools[path] = tuple(p.clone() for p in start)
        meta = build_attention_metadata(query_lens, lens, tables, block_size)
        outputs[path] = attend(q, k, v, pools[path], meta, head_dim**-0.5)
    assert all(torch.equal(a, b) for a, b in zip(pools["torch"], pools["cpu"]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs["cpu"], outputs["torch"], atol=tol, rtol=tol)


@pytest.mark.parametrize("query_lens,seq_lens", [([1], [9]), ([1, 1, 1], [5, 16, 17]), ([1, 1, 4], [3, 20, 7])])
def test_the_step_metadata_maps_each_new_token_to_its_slot(query_lens, seq_lens):
    """Slots, decode lengths and tables of a step: plain decodes (slots computed on the host) and
    a step with a prefill chunk (the tensor path), against the block table read by hand."""
    free = iter([7, 2, 11, 4, 9, 1, 3, 5, 8, 6, 0, 10])
    tables = [[next(free) for _ in range(-(-n // BS))] for n in seq_lens]
    meta = build_attention_metadata(query_lens, seq_lens, tables, BS)
    slots = [tables[s][p // BS] * BS + p % BS for s, (n, L) in enumerate(zip(query_lens, seq_lens)) for p in range(L - n, L)]
    assert meta.slot_mapping.tolist() == slots
    decodes = sum(n == 1 for n in query_lens)
    width = max(map(len, tables))
    assert meta.decode_seq_lens.tolist() == seq_lens[:decodes]
    assert meta.decode_block_tables.tolist() == [t + [0] * (width - len(t)) for t in tables[:decodes]]
    assert meta.decode_blocks == max(map(len, tables[:decodes]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads", [KVH, H])
@pytest.mark.parametrize("head_dim,block_size", [(D, BS), (16, 16), (32, 8), (64, 16), (128, 4), (48, 16)])
@pytest.mark.parametrize("num_seqs", [1, 12])  # slices of adjacent KV heads over the threads / one task per sequence
@pytest.mark.parametrize("path", DECODE_PATHS)
def test_fused_decode_kernel_matches_torch_path(dtype, kv_heads, head_dim, block_size, num_seqs, path):
    """Each path of the optional C++ decode kernel against the gather + SDPA reference path.

    The SIMD paths take head dims that are powers of two from 16 to 256 (16 and 32 hold fewer
    value groups than AVX2 accumulates at once); 8 and 48 fall back to the portable path.
    """
    from models.fused_attention import fused_decode_attention

    decode_path_or_skip(path)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    lens = ([1, block_size, block_size + 1] + [rng.randint(1, 90) for _ in range(9)])[-num_seqs:]
    free = list(range(512))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    pool = tuple(torch.randn(512, block_size, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    meta = build_attention_metadata([1] * len(lens), lens, tables, block_size)
    q = (3 * torch.randn(len(lens), H, head_dim, generator=gen)).to(dtype)  # peaked softmax too
    new_kv = torch.randn(len(lens), kv_heads, head_dim, generator=gen).to(dtype)
    reference = paged_attention(q, new_kv, new_kv, pool, meta, head_dim**-0.5)  # writes the new token too
    fused = fused_decode_attention(q, pool, meta.block_tables, meta.decode_seq_lens, head_dim**-0.5, path)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, reference, atol=tol, rtol=tol)
