"""Paged attention over a packed batch: prefill chunks and decode tokens in one call.

A step's tokens arrive packed, sequence after sequence, decodes first:

    tokens:  | d0 | d1 | d2 | p0 p0 p0 p0 p0 | p1 p1 p1 |      N = 3 + 5 + 3
    seqs:      0    1    2    3                4              S = 5, num_decode_seqs = 3

Each new token's K/V is written into the pool at its slot (`slot_mapping`), then every query
reads its sequence's keys back through the block table:

    block_table[s] = [7, 2, 9]        block_size BS = 4
    position p  ->  slot = block_table[s][p // BS] * BS + p % BS
    p = 0..3 -> slots 28..31 (block 7), p = 4..7 -> 8..11 (block 2), p = 8.. -> 36.. (block 9)

Decodes (one query each) are attended together in one padded batch; each prefill chunk is
attended on its own with a causal mask shifted by the prefix already in the cache. Short chunks
at the front (speculative verification: the last token plus K draft tokens) are attended as
decode rows too, one row per query token, each seeing the keys up to its own position:

    chunk of seq s: positions 40 41 42 (seq_len 43)  ->  rows with seq_len 41, 42, 43

Without a pool (`kv_cache is None`, the naive reference path) every sequence attends to its own
chunk only.

Legend: N tokens in the packed batch, S sequences, H query heads, KVH KV heads, D head dim,
NB blocks, BS block size, L padded key length, T tokens of one chunk.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import operator
from itertools import accumulate, chain

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.kv_int8 import read_rows, store_rows

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v pools: (NB, BS, KVH, D) each; (NB, BS, KVH, D + 4) int8 rows


@dataclass
class AttentionMetadata:
    """Where each token of a packed batch writes its K/V and which keys it reads."""

    query_start_loc: list[int]               # (S+1,) offsets of each sequence's tokens in the batch
    seq_lens: list[int]                      # (S,) tokens in context after this step (cached + new)
    num_decode_seqs: int                     # the first sequences, attended as one row per query token
    num_decode_tokens: int                   # R: their tokens, the first R of the batch (= rows)
    input_ids: torch.Tensor | None = None     # (N,) the step's tokens, when the builder was given them
    positions: torch.Tensor | None = None     # (N,) each token's position in its sequence
    logit_rows: torch.Tensor | None = None    # (R,) packed rows whose logits the step needs, when given
    query_start_loc_t: torch.Tensor | None = None  # (S+1,) query_start_loc on the device
    seq_lens_t: torch.Tensor | None = None    # (S,) seq_lens on the device
    slot_mapping: torch.Tensor | None = None  # (N,) pool slot of each new token; None: no pool
    block_tables: torch.Tensor | None = None  # (S, max_blocks) int64, padded with 0
    block_size: int = 0
    decode_block_tables: torch.Tensor | None = None  # (R, max_blocks) each decode row's block table
    decode_seq_lens: torch.Tensor | None = None   # (R,) int64 keys each decode row sees
    decode_blocks: int = 0                        # blocks of the longest decode row's table
    workspace: "DecodeWorkspace | None" = None    # reusable gather buffers (None: allocate per call)
    _gather: tuple | None = None                  # (decode_key_mask, decode_block_ids), made on first use

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def decode_key_mask(self) -> torch.Tensor:
        """(R, 1, 1, L) True where a decode row may attend, L = decode_blocks * BS (gather paths)."""
        return self._gather_layout()[0]

    @property
    def decode_block_ids(self) -> torch.Tensor:
        """(R * L/BS,) the decode rows' padded block tables, flat (gather paths)."""
        return self._gather_layout()[1]

    def _gather_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._gather is None:  # once per step, by the first layer that gathers
            key_pos = torch.arange(self.decode_blocks * self.block_size, device=self.decode_seq_lens.device)  # (L,)
            mask = (key_pos[None, :] < self.decode_seq_lens[:, None])[:, None, None, :]  # (R, 1, 1, L)
            self._gather = mask, self.decode_block_tables[:, :self.decode_blocks].flatten()
        return self._gather


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]] | None,
    block_size: int,
    device: torch.device | str = "cpu",
    num_decode_seqs: int | None = None,
    input_ids: list[int] | None = None,
    logit_rows: list[int] | None = None,
) -> AttentionMetadata:
    """Flatten per-sequence bookkeeping into the tensors attention needs, once per step.

    The host only concatenates lists (C-speed list ops: positions as ranges, block tables padded);
    one host->device copy (pinned, asynchronous on CUDA) moves them, with the input ids and logit
    rows; the slot mapping and the decode rows come from a few tensor ops there, except in a
    step of plain decodes, whose one slot per sequence rides in the copy. No per-token Python
    loop, no device->host sync.

    Args:
        query_lens: new tokens per sequence; decodes (and verification chunks) come first.
        seq_lens: context length per sequence after this step (cached + new).
        block_tables: block ids per sequence, or None for the cache-free reference path.
        block_size: tokens per block.
        num_decode_seqs: how many leading sequences to attend as decode rows, one row per
            query token (speculative verification chunks); None: the leading one-token ones.
        input_ids, logit_rows: the step's tokens (N,) and the rows to compute logits for, to
            ride along in the same copy (meta.input_ids, meta.logit_rows).
    """
    if num_decode_seqs is None:
        num_decode_seqs = 0
        while num_decode_seqs < len(query_lens) and query_lens[num_decode_seqs] == 1:
            num_decode_seqs += 1
        assert all(q > 1 for q in query_lens[num_decode_seqs:]) or not block_tables, "decodes must come first"
    starts = list(accumulate(query_lens, initial=0))
    meta = AttentionMetadata(starts, list(seq_lens), num_decode_seqs, starts[num_decode_seqs], block_size=block_size)
    num_seqs, num_tokens = len(query_lens), starts[-1]
    ids, rows_wanted = input_ids or [], logit_rows or []
    positions = list(chain.from_iterable(map(range, map(operator.sub, seq_lens, query_lens), seq_lens)))
    max_blocks = max(map(len, block_tables)) if block_tables else 0
    padded = chain.from_iterable(t + [0] * (max_blocks - len(t)) for t in block_tables or [])
    # A step of plain decodes (one token per sequence, the steady state) has one slot per
    # sequence: the host computes them with the rest (S items, no per-token loop), which saves
    # the slot mapping's handful of tensor ops below, most of a small step's bookkeeping.
    plain_decodes = block_tables is not None and num_tokens == num_seqs == num_decode_seqs
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size
             for t, n in zip(block_tables, seq_lens)] if plain_decodes else []
    ids_t, rows_t, meta.positions, meta.query_start_loc_t, meta.seq_lens_t, q_lens, tables, slots_t = to_device(
        [ids, rows_wanted, positions, starts, seq_lens, query_lens, padded, slots],
        [len(ids), len(rows_wanted), num_tokens, num_seqs + 1, num_seqs, num_seqs, num_seqs * max_blocks, len(slots)],
        device)
    meta.input_ids = ids_t if input_ids is not None else None
    meta.logit_rows = rows_t if logit_rows is not None else None
    if block_tables is None:
        meta.num_decode_seqs = meta.num_decode_tokens = 0  # no cache: every sequence attends to its own chunk
        return meta
    meta.block_tables = tables.view(num_seqs, max_blocks)  # (S, max_blocks) padded with 0
    if plain_decodes:  # token i is sequence i's, and its row sees the whole sequence
        meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens = slots_t, meta.block_tables, meta.seq_lens_t
        meta.decode_blocks = max_blocks
        return meta
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)  # (N,)
    pos = meta.positions
    meta.slot_mapping = meta.block_tables[seq_of, pos // block_size] * block_size + pos % block_size  # (N,)
    rows = meta.num_decode_tokens
    if rows:
        plain = rows == num_decode_seqs  # plain decodes: one row per sequence; else verification chunks,
        meta.decode_block_tables = meta.block_tables[:rows] if plain else meta.block_tables[seq_of[:rows]]  # (R, max_blocks)
        meta.decode_seq_lens = pos[:rows] + 1  # (R,) a verification row sees the keys up to its own position
        meta.decode_blocks = max(map(len, block_tables[:num_decode_seqs]))
    return meta


def to_device(parts: list, sizes: list[int], device: torch.device | str) -> list[torch.Tensor]:
    """Integer lists (or iterables of `sizes` items) -> int64 tensors on `device`, through one copy:
    pinned and asynchronous on CUDA, so the host never waits for the GPU's queued work."""
    host = torch.tensor(list(chain.from_iterable(parts)), dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
    return list(host.to(device, non_blocking=True).split(sizes))


class DecodeWorkspace:
    """Gather buffers reused across layers and steps, so decode attention allocates nothing."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def buffers(self, num_blocks: int, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (num_blocks, BS, KVH, D) views, grown when a step needs more."""
        if self.k is None or self.k.shape[0] < num_blocks or self.k.dtype != pool.dtype:
            rows = max(num_blocks, 2 * (0 if self.k is None else self.k.shape[0]))
            self.k = pool.new_empty(rows, *pool.shape[1:])
            self.v = pool.new_empty(rows, *pool.shape[1:])
        return self.k[:num_blocks], self.v[:num_blocks]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache | None,
    meta: AttentionMetadata,
    scale: float,
    decode: Callable | None = None,
    store_kernel=None,
) -> torch.Tensor:
    """Causal attention for a packed batch. q (N, H, D), k and v (N, KVH, D) -> (N, H, D).

    decode(q (R, H, D), kv_cache, meta, scale) -> (R, H, D) attends the decode rows (default:
    gather + SDPA); store_kernel: the C++ module that stores (and quantizes) new rows.
    models/kernels.py binds the variant this device runs."""
    if kv_cache is not None:
        write_kv(k, v, kv_cache, meta.slot_mapping, store_kernel)
    out = torch.empty_like(q)  # (N, H, D)
    rows = meta.num_decode_tokens
    if rows:
        out[:rows] = (decode or _decode_attention)(q[:rows], kv_cache, meta, scale)
    starts, seq_lens = meta.query_start_loc, meta.seq_lens
    for s in range(meta.num_decode_seqs, meta.num_seqs):
        lo, hi = starts[s], starts[s + 1]
        if kv_cache is None:
            keys, values = k[lo:hi], v[lo:hi]  # (T, KVH, D)
        else:
            keys, values = gather_kv(kv_cache, meta.block_tables[s], seq_lens[s], q.dtype)  # (L, KVH, D)
        out[lo:hi] = _prefill_attention(q[lo:hi], keys, values, scale)
    return out


class PagedAttention(nn.Module):
    """`paged_attention` as a module, so forward hooks (`nanoserve trace`) see q, k, v after the
    head split and the attention output; it holds no weights. Its owner binds `kv_cache`, the
    load binds `attend` (models/kernels.py: this device's variant of paged_attention)."""

    attend: Callable = staticmethod(paged_attention)

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(q, k, v, kv_cache, meta, self.scale)  # (N, H, D)


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor, kernel=None) -> None:
    """Store new keys and values (N, KVH, D) into the pools at their slots (quantized for int8
    pools); `kernel`: the C++ module that stores both in one call."""
    k_pool, v_pool = kv_cache
    if kernel is not None:
        kernel.store_kv(k_pool, v_pool, slot_mapping, k, v)
        return
    store_rows(k_pool, slot_mapping, k)
    store_rows(v_pool, slot_mapping, v)


def gather_kv(kv_cache: KVCache, block_table: torch.Tensor, seq_len: int, dtype: torch.dtype) -> KVCache:
    """One sequence's keys and values, in position order: (seq_len, KVH, D) each, in `dtype`."""
    k_pool, v_pool = kv_cache
    num_blocks = -(-seq_len // k_pool.shape[1])
    blocks = block_table[:num_blocks]
    keys = k_pool[blocks].flatten(0, 1)[:seq_len]  # (num_blocks*BS, KVH, W) -> (L, KVH, W)
    values = v_pool[blocks].flatten(0, 1)[:seq_len]
    return read_rows(keys, dtype), read_rows(values, dtype)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One chunk of T queries at the end of L keys (the first L - T are a cached prefix)."""
    num_q, num_k = q.shape[0], k.shape[0]
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T, D), (KVH, L, D)
    if num_q == num_k:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        q_pos = torch.arange(num_k - num_q, num_k, device=q.device)  # (T,)
        mask = torch.arange(num_k, device=q.device)[None, :] <= q_pos[:, None]  # (T, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)  # (T, H, D)


def _decode_attention(q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per row, all decode rows at once over their padded block tables."""
    k_pool, v_pool = kv_cache
    mask = meta.decode_key_mask  # (S, 1, 1, L)
    num_seqs, num_keys = mask.shape[0], mask.shape[-1]
    ids = meta.decode_block_ids  # (S * L/BS,)
    if meta.workspace is None:
        k_rows, v_rows = k_pool.index_select(0, ids), v_pool.index_select(0, ids)  # (S*L/BS, BS, KVH, D)
    else:
        k_rows, v_rows = meta.workspace.buffers(ids.numel(), k_pool)
        torch.index_select(k_pool, 0, ids, out=k_rows)
        torch.index_select(v_pool, 0, ids, out=v_rows)
    keys = read_rows(k_rows.view(num_seqs, num_keys, *k_pool.shape[2:]), q.dtype).transpose(1, 2)  # (S, KVH, L, D)
    values = read_rows(v_rows.view(num_seqs, num_keys, *v_pool.shape[2:]), q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )  # (S, H, 1, D)
    return out[:, :, 0, :]  # (S, H, D)
