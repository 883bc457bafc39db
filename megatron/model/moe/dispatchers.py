"""Token dispatchers: how routed tokens reach the experts and how their outputs come back.

A dispatcher turns a :class:`~megatron.model.moe.routing.Routing` into a
:class:`~megatron.model.moe.dispatch.DispatchPlan` (``plan``), moves tokens to the experts
(``dispatch(x, plan) -> (ExpertBatch, metadata)``) and brings the experts' output back to token order
(``combine(expert_out, metadata) -> y``). The metadata is a frozen dataclass of exactly what that
dispatcher's ``combine`` needs (one type per dispatcher, as torchtitan's ``*DispatchMetadata``): it is
returned, never stashed on the plan or the dispatcher, so one dispatcher may have several calls in flight.

The two here are local (no communication) and share :class:`LocalDispatchMetadata`; expert parallelism
installs a communicating dispatcher (``megatron/parallel``, chosen by ``--moe-token-dispatcher-type``)
with ``MoELayer.set_dispatcher``.

Shapes: S tokens, H hidden, E experts, E_l local experts, C capacity, N kept assignments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.model.moe.dispatch import DispatchPlan, plan_capacity, plan_grouped


@dataclass(frozen=True)
class ExpertBatch:
    tokens: torch.Tensor  # [E_l, C, H] zero-padded per expert, or [N_l, H] rows sorted by local expert
    counts: Optional[torch.Tensor] = None  # [E_l] rows per local expert ([N_l, H] form), None when padded


@dataclass(frozen=True)
class LocalDispatchMetadata:
    """What a local combine needs: each kept assignment's output row, its token and its weight."""

    token: torch.Tensor  # [N] token index of each kept assignment
    slot: torch.Tensor  # [N] its row of the flattened expert output ([E * C, H] or [N, H])
    weight: torch.Tensor  # [N] fp32 combine weight
    num_tokens: int  # S

    @classmethod
    def of(cls, plan: DispatchPlan, num_tokens: int) -> "LocalDispatchMetadata":
        return cls(token=plan.token, slot=plan.slot, weight=plan.weight, num_tokens=num_tokens)


class TokenDispatcher:
    """Interface. ``capacity`` None means no token is dropped."""

    # True when dispatch is a collective with ranks that route other tokens (expert parallelism): every
    # rank must then take the dispatched path on every call (no small-batch shortcut)
    peers_route_other_tokens = False
    # the weight of this rank's balancing losses (aux, z): 1/TP under sequence parallelism, where each TP rank
    # routes its own sequence shard and the router's gradients are summed over TP
    loss_share = 1.0

    def plan(self, routing, num_experts: int, capacity: Optional[int], priority, renormalize: bool) -> DispatchPlan:
        if capacity is None:
            return plan_grouped(routing.indices, routing.weights, num_experts, renormalize=renormalize)
        return plan_capacity(routing.indices, routing.weights, num_experts, capacity, priority, renormalize=renormalize)

    def dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> tuple[ExpertBatch, object]:
        """x [S, H] and its plan -> (the experts' input, the metadata ``combine`` takes)."""
        raise NotImplementedError

    def combine(self, expert_out: torch.Tensor, metadata) -> torch.Tensor:
        """The experts' output (``ExpertBatch.tokens``' layout) and ``dispatch``'s metadata -> y [S, H]."""
        raise NotImplementedError


def scatter_to_capacity(x: torch.Tensor, plan: DispatchPlan, num_experts: int) -> torch.Tensor:
    """x [S, H] -> expert buffer [E, C, H] (empty slots are zero)."""
    H = x.shape[-1]
    buf = x.new_zeros(num_experts * plan.capacity, H)  # [E * C, H]
    buf = buf.index_copy(0, plan.slot, x.index_select(0, plan.token))
    return buf.view(num_experts, plan.capacity, H)  # [E, C, H]


def weighted_combine(expert_out: torch.Tensor, meta: LocalDispatchMetadata) -> torch.Tensor:
    """expert output [E, C, H] or [N, H] -> [S, H]; each token gets the weighted sum of its kept choices,
    a fully dropped token gets 0 (only the residual stream carries it)."""
    H = expert_out.shape[-1]
    flat = expert_out.reshape(-1, H)  # [E * C, H] or [N, H]
    picked = flat.index_select(0, meta.slot) * meta.weight.to(flat.dtype)[:, None]  # [N, H]
    return flat.new_zeros(meta.num_tokens, H).index_add(0, meta.token, picked)  # [S, H]


class LocalCapacityDispatcher(TokenDispatcher):
    """All experts on this rank; each gets a zero-padded [C, H] block (token dropping)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x, plan):
        meta = LocalDispatchMetadata.of(plan, x.shape[0])
        return ExpertBatch(scatter_to_capacity(x, plan, self.num_experts)), meta  # [E, C, H]

    def combine(self, expert_out, metadata: LocalDispatchMetadata):
        return weighted_combine(expert_out, metadata)  # [E, C, H] -> [S, H]


class LocalGroupedDispatcher(TokenDispatcher):
    """All experts on this rank; rows sorted by expert, no padding (no token dropping)."""

    def dispatch(self, x, plan):
        meta = LocalDispatchMetadata.of(plan, x.shape[0])
        return ExpertBatch(x.index_select(0, plan.token), plan.counts), meta  # [N, H], [E]

    def combine(self, expert_out, metadata: LocalDispatchMetadata):
        return weighted_combine(expert_out, metadata)  # [N, H] -> [S, H]


def local_dispatcher(num_experts: int, token_dropping: bool, loss_share: float = 1.0) -> TokenDispatcher:
    d = LocalCapacityDispatcher(num_experts) if token_dropping else LocalGroupedDispatcher()
    d.loss_share = loss_share
    return d
