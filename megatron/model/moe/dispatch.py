"""Index-based token dispatch and combine (argsort / gather / index_add; no one-hot einsum).

Shapes: S tokens, H hidden, E experts, k choices per token, C capacity (slots per expert),
N kept assignments (<= S * k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DispatchPlan:
    token: torch.Tensor  # [N] token index of each kept assignment
    slot: torch.Tensor  # [N] e * C + position within expert e (capacity mode) or sorted position (grouped)
    weight: torch.Tensor  # [N] fp32 combine weight
    counts: torch.Tensor  # [E] kept assignments per expert
    capacity: int  # C (capacity mode) or 0 (grouped)
    dropped: torch.Tensor  # [] assignments dropped for lack of capacity


def _sorted_assignments(indices: torch.Tensor, weights: torch.Tensor, priority: Optional[torch.Tensor]):
    """Flatten [S, k] choices tier-major (all first choices, then all second ...), order tokens within a
    tier by descending ``priority`` (random token selection) or by position, then stable-sort by expert.

    Returns expert, token, weight of each assignment in sorted order ([S * k] each).
    """
    S, k = indices.shape
    token_order = torch.arange(S, device=indices.device) if priority is None else torch.argsort(priority, descending=True)
    expert = indices.t()[:, token_order].reshape(-1)  # [k * S] tier-major
    token = token_order.repeat(k)  # [k * S]
    weight = weights.t()[:, token_order].reshape(-1)  # [k * S]
    order = torch.argsort(expert, stable=True)  # [k * S] grouped by expert, tier then priority within
    return expert[order], token[order], weight[order]


def plan_capacity(indices, weights, num_experts: int, capacity: int, priority=None, renormalize: bool = False) -> DispatchPlan:
    """Assign each choice a slot in its expert's buffer; choices beyond ``capacity`` are dropped."""
    S, k = indices.shape
    expert, token, weight = _sorted_assignments(indices, weights, priority)  # [k * S]
    demand = torch.bincount(expert, minlength=num_experts)  # [E]
    start = torch.cumsum(demand, 0) - demand  # [E] first sorted position of each expert
    pos = torch.arange(expert.numel(), device=expert.device) - start[expert]  # [k * S] position within expert
    keep = pos < capacity
    token, weight = token[keep], weight[keep]  # [N]
    slot = expert[keep] * capacity + pos[keep]  # [N]
    if renormalize and k > 1:
        denom = torch.zeros(S, dtype=weight.dtype, device=weight.device).index_add(0, token, weight)  # [S]
        weight = weight / denom[token].clamp_min(torch.finfo(weight.dtype).eps)
    counts = torch.clamp(demand, max=capacity)
    return DispatchPlan(token=token, slot=slot, weight=weight, counts=counts, capacity=capacity,
                        dropped=(~keep).sum())


def plan_grouped(indices, weights, num_experts: int, renormalize: bool = False) -> DispatchPlan:
    """No-drop plan: every choice kept, assignments sorted by expert (no padding to a capacity)."""
    S, k = indices.shape
    expert, token, weight = _sorted_assignments(indices, weights, None)  # [k * S]
    if renormalize and k > 1:
        denom = weights.sum(dim=1)  # [S]
        weight = weight / denom[token].clamp_min(torch.finfo(weight.dtype).eps)
    counts = torch.bincount(expert, minlength=num_experts)  # [E]
    slot = torch.arange(expert.numel(), device=expert.device)
    return DispatchPlan(token=token, slot=slot, weight=weight, counts=counts, capacity=0,
                        dropped=torch.zeros((), dtype=torch.long, device=expert.device))


def dispatch(x: torch.Tensor, plan: DispatchPlan, num_experts: int) -> torch.Tensor:
    """x [S, H] -> expert buffer [E, C, H] (empty slots are zero)."""
    H = x.shape[-1]
    buf = x.new_zeros(num_experts * plan.capacity, H)  # [E * C, H]
    buf = buf.index_copy(0, plan.slot, x.index_select(0, plan.token))
    return buf.view(num_experts, plan.capacity, H)  # [E, C, H]


def gather_grouped(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x [S, H] -> tokens sorted by expert [N, H]."""
    return x.index_select(0, plan.token)


def combine(expert_out: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """expert output [E, C, H] or [N, H] -> [S, H]; each token gets the weighted sum of its kept choices,
    a fully dropped token gets 0 (only the residual stream carries it)."""
    H = expert_out.shape[-1]
    flat = expert_out.reshape(-1, H)  # [E * C, H] or [N, H]
    picked = flat.index_select(0, plan.slot) * plan.weight.to(flat.dtype)[:, None]  # [N, H]
    out = flat.new_zeros(num_tokens, H)
    return out.index_add(0, plan.token, picked)  # [S, H]
