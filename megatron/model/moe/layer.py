"""The MoE layer (standard and Residual-MoE) that replaces a transformer layer's MLP.

Shapes: B batch, T sequence, S = B*T tokens, H hidden, E experts (global), E_l local experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron.model.moe.capacity import expert_capacity
from megatron.model.moe.dispatch import combine, dispatch, gather_grouped, plan_capacity, plan_grouped
from megatron.model.moe.experts import StackedExperts
from megatron.model.moe.router import TopKRouter


class MoELayer(nn.Module):
    def __init__(self, moe_cfg, hidden_size: int, ffn_hidden_size: int, num_experts: int, layer_number: int,
                 ep_rank: int = 0, ep_size: int = 1, dense_mlp_factory=None):
        super().__init__()
        self.cfg = moe_cfg
        self.num_experts, self.layer_number = num_experts, layer_number
        self.topk = moe_cfg.topk
        self.router = TopKRouter(hidden_size, num_experts, moe_cfg.topk, moe_cfg.noisy_gate_policy,
                                 moe_cfg.top2_2nd_expert_sampling)
        num_local = num_experts // ep_size
        self.experts = StackedExperts(num_local, hidden_size, ffn_hidden_size, first_expert=ep_rank * num_local)
        self.residual = moe_cfg.mlp_type == "residual"
        if self.residual:
            self.residual_mlp = dense_mlp_factory()
            self.coefficient = nn.Linear(hidden_size, 2)

    def capacity(self, num_tokens: int) -> int:
        cf = self.cfg.train_capacity_factor if self.training else self.cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, cf, self.cfg.min_capacity, self.topk)

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        # hidden: [B, T, H] -> ([B, T, H], stats)
        B, T, H = hidden.shape
        x = hidden.reshape(B * T, H)  # [S, H]
        if token_mask is not None:  # padding stays out of routing and capacity
            keep_idx = torch.nonzero(token_mask.reshape(-1), as_tuple=False).squeeze(1)  # [S']
            x = x.index_select(0, keep_idx)  # [S', H]
        S = x.shape[0]
        routing = self.router(x)
        renorm = self.topk > 1
        grouped = (not self.cfg.token_dropping) and not self.experts.is_expert_parallel
        if grouped:
            plan = plan_grouped(routing.indices, routing.weights, self.num_experts, renormalize=renorm)
            y = combine(self.experts.forward_grouped(gather_grouped(x, plan), plan.counts), plan, S)  # [S, H]
        else:
            if self.cfg.token_dropping:
                cap = self.capacity(S)
            else:  # no drop under expert parallelism: pad to the largest demand, agreed across ranks
                cap = int(routing.counts.max())
            cap = self.experts.agree_capacity(cap)
            priority = None
            if self.training and self.cfg.token_dropping:
                priority = torch.rand(S, device=x.device)  # random token selection
            plan = plan_capacity(routing.indices, routing.weights, self.num_experts, cap, priority, renormalize=renorm)
            buf = dispatch(x, plan, self.num_experts)  # [E, C, H]
            y = combine(self.experts(buf), plan, S)  # [S, H]
        y = y.to(hidden.dtype)
        if self.residual:
            dense = self.residual_mlp(x)  # [S, H]
            coef = torch.softmax(self.coefficient(x).float(), dim=-1)  # [S, 2]
            y = (y.float() * coef[:, 0:1] + dense.float() * coef[:, 1:2]).to(hidden.dtype)
        if token_mask is not None:
            y = hidden.new_zeros(B * T, H).index_copy(0, keep_idx, y)
        stats = {
            "aux_loss": routing.aux_loss,
            "z_loss": routing.z_loss,
            "counts": routing.counts.detach().float(),  # [E] demand before dropping
            "dropped": plan.dropped.detach().float(),
            "assignments": torch.tensor(float(S * self.topk), device=x.device),
        }
        return y.reshape(B, T, H), stats
