"""What a router hands the MoE layer: the ``Routing`` of one forward, and the balancing losses.

Shapes: S tokens, E experts, k choices per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Routing:
    indices: torch.Tensor  # [S, k] int64 expert of each choice, best first
    weights: torch.Tensor  # [S, k] fp32 gate probability of each choice (not renormalised; the Megatron routers:
    # the final combine weight, see Router.renormalize_kept)
    probs: torch.Tensor  # [S, E] fp32 softmax over experts (sigmoid scores: normalised to sum 1 per token)
    aux_loss: torch.Tensor  # [] load-balancing loss; 1.0 when balanced
    z_loss: torch.Tensor  # [] mean_s logsumexp(logits)^2
    counts: torch.Tensor  # [E] demand per expert (all k choices) before dropping
    # [S, k] keep-first key under a capacity (higher is kept first), or None: tier-major position order
    priority: Optional[torch.Tensor] = None


def load_balancing_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's top-1 / top-2 l_aux = E * sum_e mean_s(probs[:, e]) * mean_s(first_choice == e)."""
    num_experts = probs.shape[1]
    me = probs.mean(dim=0)  # [E]
    ce = torch.bincount(first_choice, minlength=num_experts).to(probs.dtype) / first_choice.numel()  # [E]
    return num_experts * torch.sum(me * ce)


def topk_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's top-k (k > 2) l_aux = E^2 / k * mean_e(me_e * ce_e), ce counting all k choices.

    ce_e = fraction of tokens that chose e among any of their k choices (sum_e ce_e = k), so a
    balanced router scores 1.0 as the top-1 loss does.
    """
    S, E = probs.shape
    k = indices.shape[1]
    me = probs.mean(dim=0)  # [E]
    ce = torch.bincount(indices.reshape(-1), minlength=E).to(probs.dtype) / S  # [E]
    return torch.mean(me * ce) * E * E / k


def switch_balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Megatron-LM's aux_loss (without its coefficient): E / k * sum_e mean_s(probs[:, e]) * (count_e / S), the
    counts over all k choices; 1.0 when balanced."""
    S, E = probs.shape
    k = indices.shape[1]
    me = probs.mean(dim=0)  # [E]
    ce = torch.bincount(indices.reshape(-1), minlength=E).to(probs.dtype) / max(S, 1)  # [E]
    return torch.sum(me * ce) * E / k


def sequence_balancing_loss(probs: torch.Tensor, indices: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Megatron-LM's seq_aux_loss (DeepSeek-V3's sequence-wise loss): the switch loss per sequence, averaged.

    probs [S, E], indices [S, k], seq_ids [S] int64 (the sequence of each token; sequences may differ in length).
    Per sequence b of T_b tokens: sum_e (count_be * E / (T_b * k)) * mean_{t in b} probs[t, e].
    """
    S, E = probs.shape
    k = indices.shape[1]
    seqs, local = torch.unique(seq_ids, return_inverse=True)  # [B], [S] 0 .. B-1
    B = seqs.numel()
    lengths = torch.bincount(local, minlength=B).to(probs.dtype)  # [B]
    mean_p = probs.new_zeros(B, E).index_add(0, local, probs) / lengths[:, None]  # [B, E]
    counts = probs.new_zeros(B * E).index_add(
        0, (local[:, None] * E + indices).reshape(-1), probs.new_ones(S * k)).view(B, E)  # [B, E]
    f = counts * E / (lengths[:, None] * k)  # [B, E]
    return (f * mean_p).sum(dim=1).mean()


def gumbel_like(t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype, generator=generator)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
