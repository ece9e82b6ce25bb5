"""Multi-head Latent Attention (DeepSeek-V2/V3), over a paged pool of latents.

Instead of per-head keys and values, each token stores one compressed latent and one shared
RoPE key, and every head's K/V is a linear function of them:

    kv_a_proj(x) = [c ; k_pe]          c (L,) -> RMSNorm,  k_pe (R,) -> RoPE
    pool entry   = [c ; k_pe]          (L + R,) per token and layer: the whole KV cache
    kv_b_proj(c) = [k_nope ; v] per head, with W_UK (H, Dn, L) and W_UV (H, Dv, L)
    q_h          = [q_nope ; q_pe]     (Dn + R,), from x (or from a q LoRA: q_a -> RMSNorm -> q_b)

    score(h, t)  = q_nope_h . (W_UK_h c_t) + q_pe_h . k_pe_t
                 = (W_UK_h^T q_nope_h) . c_t + q_pe_h . k_pe_t         <- "absorbed"
    out_h        = sum_t p(h, t) W_UV_h c_t = W_UV_h (sum_t p(h, t) c_t)

Two paths compute the same attention:
  - naive: expand every cached latent into per-head K (Dn + R) and V (Dv), then ordinary
    attention. Prefill chunks always take it (compute-bound; the expansion is amortized).
  - absorbed (decode rows only): fold W_UK into the query and W_UV into the output, attend all
    H heads over the latents directly, as multi-query attention with key dim L + R and value dim
    L. Per step it reads L + R values per cached token instead of H (Dn + R + Dv) and skips the
    expansion matmul, so it wins as the context grows.

Legend: N tokens, S sequences, H heads, Dn no-RoPE head dim, R RoPE dim, Dv value head dim,
L kv_lora_rank (latent width), T keys of one sequence, Rw decode rows, K padded key length.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionMetadata
from models.kv_int8 import read_rows, store_rows
from models.layers import Linear, RMSNorm, RotaryTables

MLA_MODES = ("absorbed", "naive")
MLA_PATHS = {  # what each mode does on a decode step, for the load log
    "absorbed": "W_UK folded into q and W_UV after: every head attends over the cached latents directly",
    "naive": "every cached latent re-expanded to per-head K/V by kv_b_proj, every step",
}


class MLAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, scale: float,
                 bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        q_out = num_heads * (qk_nope_head_dim + qk_rope_head_dim)
        if q_lora_rank:
            self.q_a_proj = Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps)
            self.q_b_proj = Linear(q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = Linear(hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        self.scale = scale
        self.mode = "absorbed"
        self.kv_cache = None
        self.w_uk: torch.Tensor | None = None    # (H, Dn, L), set by prepare_absorbed
        self.w_uv_t: torch.Tensor | None = None  # (H, L, Dv)

    def prepare_absorbed(self) -> None:
        """Split kv_b_proj's weight into W_UK and W_UV^T; call before its weight is packed away.
        A quantized kv_b_proj is split from its dequantized weight, so that decode (absorbed)
        and prefill (kv_b_proj itself) compute with the same values."""
        kernel = self.kv_b_proj.kernel
        if kernel is None:
            weight = self.kv_b_proj.weight.detach()
        elif hasattr(kernel, "dequantize"):  # models/quantized_linear.py
            weight = kernel.dequantize().to(self.kv_a_layernorm.weight.dtype)
        else:  # packed: the split was made before packing
            assert self.w_uk is not None, "prepare_absorbed must run before kv_b_proj is packed"
            return
        w = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = w[:, :self.nope_dim].contiguous()  # (H, Dn, L)
        self.w_uv_t = w[:, self.nope_dim:].transpose(1, 2).contiguous()  # (H, L, Dv)

    def forward(self, x: torch.Tensor, rope: RotaryTables, meta: AttentionMetadata) -> torch.Tensor:
        H, Dn, L = self.num_heads, self.nope_dim, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)  # (N, H (Dn + R))
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # (N, q_lora) -> (N, H (Dn + R))
        q = q.view(-1, H, Dn + self.rope_dim)  # (N, H, Dn + R)
        q_nope, q_pe = q[..., :Dn], rope(q[..., Dn:])  # (N, H, Dn), (N, H, R)
        ckv = self.kv_a_proj_with_mqa(x)  # (N, L + R)
        latent = torch.cat((self.kv_a_layernorm(ckv[:, :L]), rope(ckv[:, None, L:])[:, 0]), dim=-1)  # (N, L + R)
        if self.kv_cache is not None:
            store_rows(self.kv_cache[0], meta.slot_mapping, latent[:, None])  # pool (NB, BS, 1, L + R)
        out = x.new_empty(x.shape[0], H, self.v_dim)  # (N, H, Dv)
        rows = meta.num_decode_tokens
        if rows:
            decode = self._decode_absorbed if self.mode == "absorbed" else self._decode_naive
            out[:rows] = decode(q_nope[:rows], q_pe[:rows], meta)
        starts = meta.query_start_loc
        for s in range(meta.num_decode_seqs, meta.num_seqs):
            lo, hi = starts[s], starts[s + 1]
            if self.kv_cache is None:
                keys = latent[lo:hi]  # (T, L + R): the reference path sees its own chunk only
            else:
                pool = self.kv_cache[0]  # (NB, BS, 1, L + R)
                blocks = meta.block_tables[s][:-(-meta.seq_lens[s] // pool.shape[1])]
                keys = read_rows(pool[blocks].view(-1, pool.shape[-1])[:meta.seq_lens[s]], q.dtype)  # (T_k, L + R)
            out[lo:hi] = self._prefill_naive(q_nope[lo:hi], q_pe[lo:hi], keys)
        return self.o_proj(out.flatten(1))  # (N, H Dv) -> (N, C)

    def _expand(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (..., L + R) -> per-head keys (..., H, Dn + R) and values (..., H, Dv)."""
        L, H = self.kv_lora_rank, self.num_heads
        kv = self.kv_b_proj(latents[..., :L].flatten(0, -2)).view(*latents.shape[:-1], H, self.nope_dim + self.v_dim)
        k_pe = latents[..., None, L:].expand(*latents.shape[:-1], H, self.rope_dim)  # shared by every head
        return torch.cat((kv[..., :self.nope_dim], k_pe), dim=-1), kv[..., self.nope_dim:]

    def _prefill_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """A chunk of T queries at the end of its sequence's latents (T_k, L + R) -> (T, H, Dv)."""
        keys, values = self._expand(latents)  # (T_k, H, Dn + R), (T_k, H, Dv)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # (H, T, Dn + R)
        num_q, num_k = q.shape[1], keys.shape[0]
        mask = torch.arange(num_k, device=q.device)[None, :] <= torch.arange(num_k - num_q, num_k, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(q, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                                             scale=self.scale)  # (H, T, Dv)
        return out.transpose(0, 1)

    def _decode_latents(self, meta: AttentionMetadata, dtype: torch.dtype) -> torch.Tensor:
        """Every decode row's latents, padded to the longest row, in `dtype`: (Rw, K, L + R).

        Gathered into the step's reusable workspace when there is one: a fresh buffer of this
        size costs more in page faults than the copy itself."""
        pool = self.kv_cache[0]  # (NB, BS, 1, L + R)
        num_rows, num_keys = meta.decode_key_mask.shape[0], meta.decode_key_mask.shape[-1]
        ids = meta.decode_block_ids  # (Rw * K / BS,)
        if meta.workspace is None:
            blocks = pool.index_select(0, ids)  # (Rw * K / BS, BS, 1, L + R)
        else:
            blocks = meta.workspace.buffers(ids.numel(), pool)[0]
            torch.index_select(pool.view(pool.shape[0], -1), 0, ids, out=blocks.view(ids.numel(), -1))
        return read_rows(blocks.view(num_rows, num_keys, pool.shape[-1]), dtype)

    def _decode_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Expand every cached latent of every row, then attend: (Rw, H, Dv)."""
        keys, values = self._expand(self._decode_latents(meta, q_nope.dtype))  # (Rw, K, H, Dn + R), (Rw, K, H, Dv)
        q = torch.cat((q_nope, q_pe), dim=-1)[:, :, None, :]  # (Rw, H, 1, Dn + R)
        out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=meta.decode_key_mask, scale=self.scale)  # (Rw, H, 1, Dv)
        return out[:, :, 0]

    def _decode_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attend over the latents with W_UK folded into q and W_UV applied after: (Rw, H, Dv)."""
        if self.w_uk is None:
            self.prepare_absorbed()
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # (H, Rw, Dn) x (H, Dn, L) -> (Rw, H, L)
        q = torch.cat((q_latent, q_pe), dim=-1)  # (Rw, H, L + R)
        latents = self._decode_latents(meta, q.dtype)  # (Rw, K, L + R): one latent "KV head" shared by all H heads
        scores = torch.bmm(q, latents.transpose(1, 2)).float() * self.scale  # (Rw, H, K), no per-head copy of K
        scores.masked_fill_(~meta.decode_key_mask[:, 0], float("-inf"))  # (Rw, 1, K) broadcast over heads
        probs = scores.softmax(-1).to(q.dtype)  # (Rw, H, K)
        # values are the latents' first L dims; multiplying all L + R contiguous ones and dropping R
        # outputs is ~4x faster here than a bmm over the strided (Rw, K, L) slice
        o_latent = torch.bmm(probs, latents)[..., :self.kv_lora_rank]  # (Rw, H, K) x (Rw, K, L + R) -> (Rw, H, L)
        return torch.bmm(o_latent.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # (H, Rw, L) x (H, L, Dv) -> (Rw, H, Dv)
