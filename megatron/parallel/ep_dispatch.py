"""What expert parallelism's token dispatchers share: the EP group, capacity agreement, timing, the TP split.

Each rank holds E_l = E / ep experts (global ids r*E_l .. (r+1)*E_l - 1 on EP rank r). A dispatcher
plans this rank's tokens like the local dispatchers do, after agreeing the capacity (MAX over the EP
group, so every rank's [E, C, H] buffer has one shape); ``expert_parallel.py`` (all-to-all) and
``allgather_dispatcher.py`` (all-gather) move the tokens, and ``expert_parallel.TOKEN_DISPATCHERS``
chooses between them (``--moe-token-dispatcher-type``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.distributed as dist

from megatron.model.moe.dispatch import DispatchPlan
from megatron.model.moe.dispatchers import TokenDispatcher


@dataclass(frozen=True)
class TPSplit:
    """The TP group the routed tokens are split over (each TP rank routes the same tokens)."""

    group: object
    rank: int
    size: int


class ExpertParallelDispatcher(TokenDispatcher):
    """A dispatcher over the EP ``group`` of ``ep_size`` ranks (with ``tp``: splitting the routed tokens over
    the TP ranks too; ``ep_size`` 1 for that split alone). Its collectives run inside ``timer`` when set."""

    def __init__(self, group, ep_size: int, num_experts: int, device, timer: Optional[ContextManager] = None,
                 tp: Optional[TPSplit] = None):
        self.group, self.ep, self.num_experts, self.device = group, ep_size, num_experts, device
        self.num_local = num_experts // ep_size
        self.timer = timer
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.peers_route_other_tokens = ep_size > 1  # TP peers route the same tokens

    def set_timer(self, timer: Optional[ContextManager]) -> None:
        """Every exchange from now on (the token exchanges and the capacity agreement) runs inside ``timer``
        (None: untimed)."""
        self.timer = timer

    def plan(self, routing, num_experts, capacity, priority, renormalize) -> DispatchPlan:
        if capacity is not None and self.ep > 1:  # ranks must agree on the buffer shape
            t = torch.tensor([capacity], dtype=torch.int64, device=self.device)
            with self.timer or contextlib.nullcontext():
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            capacity = int(t.item())
        return super().plan(routing, num_experts, capacity, priority, renormalize)
