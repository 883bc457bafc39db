"""Auxiliary-loss-free load balancing (DeepSeek-V3): a per-expert bias steers selection only.

The bias is added to the gate probabilities when choosing experts; the combine weights stay the
unbiased probabilities. After each optimizer step the trainer calls
``megatron.parallel.router_balance.update_router_biases``, which sums this router's pending
per-expert loads over the data-parallel replicas and calls :meth:`update_bias`:
``bias += rate * sign(mean load - load)``. The bias is a frozen (``requires_grad=False``)
parameter so that checkpoints carry it like any dense weight; the optimizer never sees it.
"""
from __future__ import annotations

import torch

from megatron.model.moe.routers.topk import TopKRouter
from megatron.model.moe.routing import Routing


class ExpertBiasBalancing:
    """The aux-loss-free state and its update, for a router class that mixes it in (before its base router):
    ``expert_bias`` [E] (frozen parameter), ``pending_load`` [E] (non-persistent buffer), ``update_bias``."""

    balances_after_step = True  # pending_load, update_bias

    @classmethod
    def num_parameters(cls, hidden_size: int, num_experts: int) -> int:
        return super().num_parameters(hidden_size, num_experts) + num_experts  # + expert_bias

    def _init_expert_bias(self, num_experts: int, moe_cfg) -> None:
        self.rate = moe_cfg.router_bias_update_rate
        self.expert_bias = torch.nn.Parameter(torch.zeros(num_experts), requires_grad=False)  # [E]
        self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)  # [E] since last update

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Start the non-persistent state at zero (a meta-device build gets uninitialised storage; checkpoints do
        not carry it)."""
        self.pending_load.zero_()

    def _count_load(self, routing: Routing) -> Routing:
        recomputing = torch._C._current_graph_task_id() != -1  # activation checkpointing re-runs it in backward
        if self.training and not recomputing:
            self.pending_load += routing.counts.to(self.pending_load.dtype)
        return routing

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """load [E]: assignments per expert since the last update, summed over every replica."""
        self.expert_bias += self.rate * torch.sign(load.float().mean() - load.float()).to(self.expert_bias.dtype)
        self.pending_load.zero_()


class AuxLossFreeRouter(ExpertBiasBalancing, TopKRouter):
    description = "DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias on the scores, for the choice only"
    plain_eval = True  # select() adds the bias; the rest is TopKRouter's
    hf_router_type = "aux_free"  # the transformers Router holds expert_bias

    def __init__(self, hidden_size: int, num_experts: int, moe_cfg):
        super().__init__(hidden_size, num_experts, moe_cfg)
        self._init_expert_bias(num_experts, moe_cfg)

    def select(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        biased = probs + self.expert_bias.float()  # [S, E], for the choice only
        return torch.topk(biased, self.topk, dim=-1).indices  # [S, k]

    def forward(self, x: torch.Tensor) -> Routing:
        return self._count_load(super().forward(x))
