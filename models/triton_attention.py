"""Triton kernels for the paged KV cache on CUDA: store new K/V, and attend a whole mixed batch.

Two kernels, one launch each per layer and step:

  store_kv            each new token's K and V go to its pool slot (a negative slot: padding, skipped)
  unified_attention   every query of the packed batch (decodes, verification chunks, prefill chunks
                      with a cached prefix) attends its sequence's keys through the block table

The pools are paged, as in models/attention.py:

    pool (NB, BS, KVH, D)           block_table[s] = [7, 2, 9], BS = 4
    position p -> block_table[s][p // BS], row p % BS;  slot = block * BS + p % BS

unified_attention runs one program per (query block, KV head). A query block is BLOCK_Q
consecutive query tokens of one sequence; its G = H / KVH query heads that share the KV head
are stacked into the rows of one tile, so each K/V page is loaded once for the whole group:

    tile rows (G = 2, BLOCK_M = 16, BLOCK_Q = 8):   q0h0 q0h1 q1h0 q1h1 q2h0 q2h1 ... q7h1
    row r -> query token r // G of the block, head kv_head * G + r % G

BLOCK_M is 16 rows (tl.dot's minimum), or the next power of two >= G; BLOCK_Q = BLOCK_M // G,
and rows past BLOCK_Q * G (G not a power of two) stay idle.

Sequence s owns the query-block ids from first(s) = query_start_loc[s] // BLOCK_Q + s on. The
"+ s" leaves room for ceil(q_len / BLOCK_Q) blocks, at most one spare, so the N // BLOCK_Q + S
programs of the grid cover any batch without the host reading a single q_len:

    BLOCK_Q = 4, q_lens 1, 3, 9:  query_start_loc 0 1 4 13  ->  first 0 1 3, grid 13 // 4 + 3 = 6
    program:  0    1    2      3    4    5
    owner:    s0   s1   s1     s2   s2   s2      (program 2: s1's spare, it returns at once)

A program finds its sequence by binary search over first(s); the launch never syncs the host.

The kernels load 16-bit values and compute in float32 (the Triton interpreter, which the
CPU tests run under, gets bfloat16 arithmetic wrong). int8 pools (models/kv_int8.py) are not
handled here; callers fall back to the PyTorch path for them.

Legend: N tokens in the packed batch, S sequences, H query heads, KVH KV heads, G = H / KVH,
D head dim, NB blocks, BS block size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])  # a slice of the packed step buffer
def _store_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_mapping_ptr,
                     stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,  # k, v (N, KVH, D)
                     stride_block, stride_row, stride_pool_head,  # pools (NB, BS, KVH, D)
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """One program per (token, KV head): copy one key row and one value row into the pools."""
    token, head = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padded token
        return
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = offs_d < HEAD_DIM
    dst = (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_row + head * stride_pool_head + offs_d
    k = tl.load(k_ptr + token * stride_k_tok + head * stride_k_head + offs_d, mask=mask)  # (D,)
    v = tl.load(v_ptr + token * stride_v_tok + head * stride_v_head + offs_d, mask=mask)  # (D,)
    tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=mask)
    tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v (N, KVH, D) into the pools (NB, BS, KVH, D) at slot_mapping (N,); slots < 0 are skipped.

    The values are cast to the pools' dtype (any float dtype; int8 pools are not handled here).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    _check_pools(k_pool, v_pool)
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "k, v: (N, KVH, D), rows contiguous"
    assert slot_mapping.shape == (num_tokens,) and k_pool.shape[2:] == (num_kv_heads, head_dim)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k, v, k_pool, v_pool, slot_mapping, *k.stride()[:2], *v.stride()[:2], *k_pool.stride()[:3],
        BLOCK_SIZE=k_pool.shape[1], HEAD_DIM=head_dim, HEAD_DIM_PAD=_padded(head_dim))


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, q_block_id, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first query-block id, query_start_loc[s] // BLOCK_Q + s, is <= q_block_id."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# One compiled kernel for every batch: Triton would otherwise specialize on the batch size, on the
# padded block-table width (a multiple of 16 or not) and on the alignment of the step's metadata,
# which are slices of one packed buffer (models/attention.py), and recompile inside timed steps.
@triton.jit(do_not_specialize=["num_seqs", "stride_table"],
            do_not_specialize_on_alignment=["block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr"])
def _unified_attention_kernel(
        q_ptr, k_pool_ptr, v_pool_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
        scale, num_seqs,
        stride_q_tok, stride_q_head,                  # q (N, H, D)
        stride_o_tok, stride_o_head,                  # out (N, H, D)
        stride_block, stride_row, stride_pool_head,   # pools (NB, BS, KVH, D)
        stride_table,                                 # block_tables (S, max_blocks)
        G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_Q queries of one sequence x the G heads of one KV head, over all its pages."""
    # Phase 1: which sequence, and which of its query blocks, this program owns.
    q_block_id, kv_head = tl.program_id(0), tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, num_seqs, q_block_id, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block_id - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:  # the spare id at the end of a sequence's range, or past the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len  # keys already in the cache before this step's tokens

    # Phase 2: load the query tile, the G heads of each query token in adjacent rows.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_idx = local_block * BLOCK_Q + offs_m // G  # (BLOCK_M,) query index within the sequence
    head = kv_head * G + offs_m % G              # (BLOCK_M,) query head
    row_ok = (offs_m < BLOCK_Q * G) & (q_idx < q_len)
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + q_idx).to(tl.int64) * stride_q_tok + head * stride_q_head  # (BLOCK_M,)
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(tl.float32) * scale  # (BLOCK_M, D)
    q_pos = prefix_len + q_idx    # (BLOCK_M,) position of each row's token: it sees keys 0..q_pos

    # Phase 3: online softmax over the pages, up to the last key any row of the tile can see.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max score per row
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of exp(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)  # running sum of exp(score - m_i) * v
    num_keys = tl.minimum(prefix_len + (local_block + 1) * BLOCK_Q, seq_len)
    offs_row = tl.arange(0, BLOCK_SIZE)
    for page in range(0, tl.cdiv(num_keys, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_table + page).to(tl.int64)
        k_pos = page * BLOCK_SIZE + offs_row  # (BS,)
        kv_offs = block * stride_block + offs_row[:, None] * stride_row + kv_head * stride_pool_head + offs_d[None, :]
        kv_mask = (k_pos < seq_len)[:, None] & d_ok[None, :]  # rows past the end may hold anything
        k = tl.load(k_pool_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)  # (BS, D)
        v = tl.load(v_pool_ptr + kv_offs, mask=kv_mask, other=0.0).to(tl.float32)  # (BS, D)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BS)
        scores = tl.where(k_pos[None, :] <= q_pos[:, None], scores, float("-inf"))
        # key 0 is on the first page and every row sees it, so m_new is finite from the first page on
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # (BLOCK_M,)
        alpha = tl.exp(m_i - m_new)                      # (BLOCK_M,) rescales what came before
        p = tl.exp(scores - m_new[:, None])              # (BLOCK_M, BS)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)  # (BLOCK_M, D)
        m_i = m_new

    # Phase 4: normalize and write each row back to its (token, head).
    out = acc / l_i[:, None]  # (BLOCK_M, D)
    o_rows = (q_start + q_idx).to(tl.int64) * stride_o_tok + head * stride_o_head  # (BLOCK_M,)
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def unified_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a packed batch of queries over the paged KV cache, in one kernel launch.

    Args:
        q: (N, H, D) queries, sequence after sequence.
        k_pool, v_pool: (NB, BS, KVH, D) pools (float dtypes; int8 pools are not handled here),
            already holding this step's new keys and values (store_kv).
        block_tables: (S, max_blocks) int32/int64 block ids of each sequence, padded.
        query_start_loc: (S+1,) int32/int64 offsets of each sequence's queries in q.
        seq_lens: (S,) int32/int64 keys in context after this step (cached prefix + new tokens).
        scale: the softmax scale, usually D ** -0.5.
        out: optional (N, H, D) output buffer.

    Returns:
        (N, H, D) attention output in q's dtype: query i of sequence s, at position
        seq_lens[s] - q_len[s] + i, attends to keys 0..that position.
    """
    num_tokens, num_heads, head_dim = q.shape
    _check_pools(k_pool, v_pool)
    _, block_size, num_kv_heads, pool_head_dim = k_pool.shape
    num_seqs = seq_lens.shape[0]
    assert pool_head_dim == head_dim and num_heads % num_kv_heads == 0, (q.shape, k_pool.shape)
    assert block_size >= 16, "tl.dot needs tiles of at least 16 keys"
    assert query_start_loc.shape == (num_seqs + 1,) and block_tables.shape[0] == num_seqs
    assert q.stride(-1) == 1 and block_tables.stride(-1) == 1
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    block_m = max(16, triton.next_power_of_2(group))  # tl.dot wants at least 16 rows
    block_q = block_m // group                        # query tokens per tile (rows past block_q * G idle)
    precision = "ieee" if torch.float32 in (q.dtype, k_pool.dtype) else "tf32"  # 16-bit inputs: tf32 is precise enough
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)  # an upper bound on query blocks, no host sync
    _unified_attention_kernel[grid](
        q, k_pool, v_pool, out, block_tables, query_start_loc, seq_lens, scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_pool.stride()[:3], block_tables.stride(0),
        G=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_padded(head_dim), DOT_PRECISION=precision)
    return out


def _check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    assert k_pool.dtype.is_floating_point, f"{k_pool.dtype} pools are not handled by the Triton kernels"
    assert k_pool.shape == v_pool.shape and k_pool.stride() == v_pool.stride() and k_pool.stride(-1) == 1
    assert triton.next_power_of_2(k_pool.shape[1]) == k_pool.shape[1], "block size must be a power of two"


def _padded(head_dim: int) -> int:
    """Head dims that are not a power of two (or under 16) are padded and masked."""
    return max(16, triton.next_power_of_2(head_dim))
