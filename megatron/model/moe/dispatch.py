"""Dispatch plans: which slot of which expert each kept (token, choice) assignment takes.

A router's :class:`~megatron.model.moe.routing.Routing` becomes a :class:`DispatchPlan` here (through a
token dispatcher's ``plan``); the dispatcher's ``dispatch`` turns the plan into an ``ExpertBatch`` and the
metadata its ``combine`` needs (``dispatchers.py``). A plan is immutable: nothing is stashed on it.

Shapes: S tokens, H hidden, E experts, k choices per token, C capacity (slots per expert),
N kept assignments (<= S * k).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class DispatchPlan:
    token: torch.Tensor  # [N] token index of each kept assignment
    slot: torch.Tensor  # [N] e * C + position within expert e (capacity mode) or sorted position (grouped)
    weight: torch.Tensor  # [N] fp32 combine weight
    counts: torch.Tensor  # [E] kept assignments per expert
    capacity: int  # C (capacity mode) or 0 (grouped)
    dropped: torch.Tensor  # [] assignments dropped for lack of capacity


def _sorted_assignments(indices: torch.Tensor, weights: torch.Tensor, priority: Optional[torch.Tensor]):
    """Flatten [S, k] choices tier-major (all first choices, then all second ...), in position order or,
    given ``priority`` [S, k], by descending priority; then stable-sort by expert.

    Returns expert, token, weight of each assignment in sorted order ([S * k] each).
    """
    S, k = indices.shape
    expert = indices.t().reshape(-1)  # [k * S] tier-major
    token = torch.arange(S, device=indices.device).repeat(k)  # [k * S]
    weight = weights.t().reshape(-1)  # [k * S]
    if priority is not None:
        first = torch.argsort(priority.t().reshape(-1), descending=True, stable=True)  # [k * S]
        expert, token, weight = expert[first], token[first], weight[first]
    order = torch.argsort(expert, stable=True)  # [k * S] grouped by expert, keep-first order within
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
