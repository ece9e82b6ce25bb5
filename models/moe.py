"""Mixture-of-Experts feed-forward: a router picks top-k experts per token, tokens are dispatched
to them in one grouped matmul, and shared experts (DeepSeek) see every token.

Routing, as DeepSeek-V2/V3 and Qwen3-MoE define it:

    scores  = softmax(x W_r^T)            (V2, Qwen3-MoE)   or  sigmoid(x W_r^T)  (V3)
    choice  = scores + bias               the bias only steers selection (V3's aux-loss-free balancing)
    groups  : experts split into n_group groups; only the best topk_group groups are eligible
              (group score: max of the group (V2), or the sum of its two best choices (V3))
    top-k   = the k best eligible choices; weights = scores at those experts
              (renormalized to sum 1 when norm_topk_prob), times routed_scaling_factor

Dispatch: the N*K (token, expert) pairs are sorted by expert, so each expert's tokens are one
contiguous slice; one grouped GEMM (or one matmul per expert that has tokens) runs SwiGLU on the
slices, and the outputs are scaled by their weights and summed back per token.

Legend: N tokens, C channels, E experts, K experts per token, I expert intermediate size,
G expert groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import GatedMLP


@dataclass
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int                 # I, per expert
    scoring: str = "softmax"               # "softmax" (V2, Qwen3-MoE) or "sigmoid" (V3)
    num_groups: int = 1                    # G; 1: no group limit
    topk_groups: int = 1
    group_score: str = "max"               # "max" (V2 group_limited_greedy) or "top2_sum" (V3)
    correction_bias: bool = False          # V3: e_score_correction_bias, selection only
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0            # DeepSeek: one SwiGLU of width I * num_shared_experts

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE scoring {self.scoring!r} is not supported (use softmax or sigmoid)")
        if self.num_experts % self.num_groups or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"{self.num_experts} experts cannot be split into {self.num_groups} groups "
                             f"choosing {self.topk_groups}")
        if not 1 <= self.top_k <= self.num_experts // self.num_groups * self.topk_groups:
            raise ValueError(f"top_k {self.top_k} exceeds the {self.topk_groups} eligible groups' experts")


class TopKRouter(nn.Module):
    """x (N, C) -> weights (N, K) float32 and expert ids (N, K); computed in float32."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, dim))  # (E, C)
        if config.correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))  # (E,)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.softmax(-1) if c.scoring == "softmax" else logits.sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float() if c.correction_bias else scores
        if c.num_groups > 1:
            grouped = choice.view(-1, c.num_groups, c.num_experts // c.num_groups)  # (N, G, E/G)
            if c.group_score == "max":
                group_scores = grouped.amax(-1)  # (N, G)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            best_groups = group_scores.topk(c.topk_groups, dim=-1).indices  # (N, topk_groups)
            eligible = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)  # (N, G)
            choice = grouped.masked_fill(~eligible[:, :, None], float("-inf")).flatten(1)  # (N, E)
        expert_ids = choice.topk(c.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, expert_ids)  # (N, K)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, expert_ids


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate_up_proj (E, 2I, C), down_proj (E, C, I).

    Under tensor parallelism a rank holds experts [first_expert, first_expert + num_local_experts)
    only (models/tp_shard.py) and computes the pairs routed to them; the block sums the ranks."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.first_expert, self.num_local_experts = 0, config.num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * config.intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, dim, config.intermediate_size))
        self.use_grouped_mm = hasattr(torch, "_grouped_mm")  # one kernel for all experts; else one mm each

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C), weights and expert_ids (N, K) -> (N, C), and tokens per expert (E,)."""
        num_tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.flatten()  # (N*K,)
        order = flat_ids.argsort(stable=True)  # (N*K,) pairs sorted by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # (E,)
        local_counts = counts
        if self.num_local_experts != self.num_experts:  # tensor parallel: this rank's experts' run of pairs
            first, last = self.first_expert, self.first_expert + self.num_local_experts
            skip, keep = int(counts[:first].sum()), int(counts[first:last].sum())
            order, local_counts = order[skip:skip + keep], counts[first:last]
        token_of = order // top_k  # (M,) the token of each pair computed here (all N*K without TP)
        xs = x[token_of]  # (M, C), each expert's tokens contiguous
        gate, up = self._grouped(xs, self.gate_up_proj, local_counts).chunk(2, dim=-1)  # 2 x (M, I)
        ys = self._grouped(F.silu(gate) * up, self.down_proj, local_counts)  # (M, C)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)  # (M, C)
        out = torch.zeros_like(x).index_add_(0, token_of, ys)  # (N, C): each token's K outputs summed
        return out, counts

    def _grouped(self, xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of xs, in runs of counts[e], times w[e]^T: (M, in) x (E, out, in) -> (M, out)."""
        if self.use_grouped_mm:
            offsets = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's run
            return torch._grouped_mm(xs, w.transpose(1, 2), offs=offsets)
        return grouped_mm_reference(xs, w, counts)


def grouped_mm_reference(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One matmul per expert that has tokens (a loop over experts, never over tokens)."""
    out = xs.new_empty(xs.shape[0], w.shape[1])  # (M, out)
    start = 0
    for expert, n in enumerate(counts.tolist()):
        if n:
            torch.mm(xs[start:start + n], w[expert].t(), out=out[start:start + n])
            start += n
    return out


class SparseMoE(nn.Module):
    """Routed experts plus optional shared experts; keeps a running count of tokens per expert."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.gate = TopKRouter(dim, config)
        self.experts = Experts(dim, config)
        if config.num_shared_experts:
            self.shared_experts = GatedMLP(dim, config.intermediate_size * config.num_shared_experts)
        self.expert_tokens: torch.Tensor | None = None  # (E,) int64 since the last drain; not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)  # (N, K) each
        out, counts = self.experts(x, weights, expert_ids)  # (N, C), (E,)
        self.expert_tokens = counts if self.expert_tokens is None else self.expert_tokens + counts
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def drain_expert_load(layers: list[SparseMoE]) -> torch.Tensor | None:
    """Tokens routed to each expert since the last call, (MoE layers, E), and reset; None if dense."""
    if not layers:
        return None
    num_experts, device = layers[0].experts.num_experts, layers[0].gate.weight.device
    load = torch.stack([torch.zeros(num_experts, dtype=torch.int64, device=device) if m.expert_tokens is None
                        else m.expert_tokens for m in layers]).cpu()  # (L_moe, E), one device->host copy
    for m in layers:
        m.expert_tokens = None
    return load
