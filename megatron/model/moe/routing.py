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
    weights: torch.Tensor  # [S, k] fp32 gate probability of each choice (not renormalised)
    probs: torch.Tensor  # [S, E] fp32 softmax over experts
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


def gumbel_like(t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype, generator=generator)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
