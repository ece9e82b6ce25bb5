"""Tensor parallelism's collectives, as the model files call them.

A tensor-parallel model is the same model on every rank with each weight cut into one slice per
rank (models/tp_shard.py makes the cuts):

    column-parallel   qkv / c_attn, gate_up / c_fc: each rank computes its heads / its columns
    row-parallel      o_proj / c_proj, down_proj: each rank's output is a partial sum ...
    AllReduce         ... which the block sums over the ranks before the residual add
    vocab-parallel    each rank holds V/P rows of the embedding (= the tied LM head): lookups of
                      other ranks' tokens give zeros and are summed in; logits are gathered

Without a group (tensor-parallel size 1, the default) every piece here is the identity, so the
single-process model reads and runs as before. Backend: gloo on CPU (all-reduces of up to 8 MiB
through shared memory instead, models/shm_all_reduce.py), NCCL on CUDA.

Legend: N tokens, C channels, M logit rows, V vocab, P ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.shm_all_reduce import SharedMemoryAllReduce


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (the default process group)."""

    rank: int
    size: int
    shared_memory: SharedMemoryAllReduce | None = field(default=None, compare=False)  # CPU ranks on one host

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place: through shared memory where it takes x, else the process group."""
        if self.shared_memory is not None and self.shared_memory.takes(x):
            return self.shared_memory(x)
        if not x.is_contiguous():  # the process group reduces contiguous buffers only
            return x.copy_(self.all_reduce(x.contiguous()))
        dist.all_reduce(x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x on rank 0 (None on the others)."""
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x.contiguous(), parts, dst=0)
        return parts

    def shard_range(self, total: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `total` (total divisible by size)."""
        share = total // self.size
        return self.rank * share, (self.rank + 1) * share


class AllReduce(nn.Module):
    """Sums a row-parallel sublayer's partial outputs over the ranks; the identity without TP."""

    def __init__(self):
        super().__init__()
        self.tp: TensorParallel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) partial -> (N, C) full
        return x if self.tp is None else self.tp.all_reduce(x)


class VocabParallel(nn.Module):
    """The token embedding's and LM head's vocab split: rank r holds rows [start, start + rows)
    of the (padded) vocabulary. Weightless; the model calls `embed` and `gather_logits`."""

    def __init__(self):
        super().__init__()
        self.tp: TensorParallel | None = None
        self.vocab_start, self.vocab_size = 0, 0  # this rank's first row, and the unpadded V

    def embed(self, embedding: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of `embedding` (this rank's shard) for input_ids (N,) -> (N, C), summed over ranks."""
        if self.tp is None:
            return embedding(input_ids)
        local = input_ids - self.vocab_start  # (N,)
        mine = (local >= 0) & (local < embedding.num_embeddings)  # (N,) tokens in this rank's shard
        rows = embedding(torch.where(mine, local, 0))  # (N, C)
        return self.tp.all_reduce(rows * mine[:, None].to(rows.dtype))

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """This rank's (M, V/P) logits -> the full (M, V) on rank 0; None on the other ranks."""
        if self.tp is None:
            return logits
        parts = self.tp.gather_to_first(logits)
        return None if parts is None else torch.cat(parts, dim=-1)[:, :self.vocab_size]


def shard_rows(weight: torch.Tensor, tp: TensorParallel, pad_to: int | None = None) -> torch.Tensor:
    """This rank's rows of weight (R, ...), after zero-padding R to `pad_to` rows."""
    if pad_to is not None and pad_to > weight.shape[0]:
        weight = F.pad(weight, (0, 0, 0, pad_to - weight.shape[0]))
    start, end = tp.shard_range(weight.shape[0])
    return weight[start:end]
