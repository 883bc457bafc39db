"""DeepSpeed's TopKGate in fp32: top-1, top-2 and top-k gating with their balancing losses and drop orders.

Shapes: S tokens, H hidden, E experts, k choices per token.

Drop order under a capacity (which assignments an expert keeps first):
- k = 1: random token selection in training (DeepSpeed's ``use_rts``; ``--disable-moe-rts`` turns it
  off), else position order;
- k = 2: first choices before second choices, each in position order (DeepSpeed's top2gating);
- k > 2: highest gate probability first (DeepSpeed's topkgating, drop policy "probs").
Evaluation always keeps position order for k <= 2 (deterministic). ``--moe-token-drop-policy probs`` or
``position`` (Megatron-LM's policies) replaces this order for every k, in training and evaluation: the
highest gate probability first, or the earliest token first (all of a token's choices before the next token's).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.moe.routers.base import Router
from megatron.model.moe.routing import Routing, gumbel_like, load_balancing_loss, topk_balancing_loss


class TopKRouter(Router):
    description = "DeepSpeed's top-k gate"
    plain_eval = True  # evaluation: softmax, select, gather (noise, RTS and 2nd-expert sampling are training-only)
    hf_router_type = "topk"

    @classmethod
    def num_parameters(cls, hidden_size: int, num_experts: int) -> int:
        return hidden_size * num_experts  # wg

    def __init__(self, hidden_size: int, num_experts: int, moe_cfg):
        super().__init__()
        self.num_experts, self.topk = num_experts, moe_cfg.topk
        self.noisy_gate_policy = moe_cfg.noisy_gate_policy
        self.second_expert_sampling = moe_cfg.top2_2nd_expert_sampling
        self.use_rts = moe_cfg.use_rts
        self.drop_policy = moe_cfg.token_drop_policy
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)  # kept in fp32

    def select(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """logits, probs [S, E] -> chosen experts [S, k], best first."""
        if self.topk == 1:
            if self.training and self.noisy_gate_policy == "RSample":
                return torch.argmax(logits + gumbel_like(logits), dim=-1)[:, None]  # [S, 1]
            return torch.argmax(probs, dim=-1)[:, None]  # [S, 1]
        if self.topk == 2 and self.training and self.second_expert_sampling:
            first = torch.argmax(probs, dim=-1)  # [S]
            masked = (logits + gumbel_like(logits)).scatter(1, first[:, None], float("-inf"))
            second = torch.argmax(masked, dim=-1)  # [S] 2nd expert by Gumbel sampling (training only)
            return torch.stack([first, second], dim=1)  # [S, 2]
        return torch.topk(probs, self.topk, dim=-1).indices  # [S, k]

    def drop_priority(self, routing: Routing):
        """[S, k] keep-first key for a capacity-limited dispatch, or None for tier-major position order."""
        S, k = routing.indices.shape
        if self.drop_policy == "probs":
            return routing.weights  # [S, k]
        if self.drop_policy == "position":
            pos = torch.arange(S, 0, -1, device=routing.indices.device)  # [S] int64, early = high
            return pos[:, None].expand(S, k)  # [S, k]
        if self.topk == 1 and self.training and self.use_rts:
            return torch.rand(S, 1, device=routing.indices.device)  # random token selection
        if self.topk > 2:
            return routing.weights  # drop by gate probability
        return None

    def forward(self, x: torch.Tensor) -> Routing:
        # x: [S, H] -> Routing
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            if self.training and self.noisy_gate_policy == "Jitter":
                xf = xf * torch.empty_like(xf).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
            logits = F.linear(xf, self.wg.weight.float())  # [S, E]
            probs = torch.softmax(logits, dim=-1)  # [S, E]
            indices = self.select(logits, probs)  # [S, k]
            weights = probs.gather(1, indices)  # [S, k]
            aux = self.balancing_loss(probs, indices)
            z = self.z_loss(logits)
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)  # [E]
        return Routing(indices=indices, weights=weights, probs=probs, aux_loss=aux, z_loss=z, counts=counts)

    def route_plain(self, x: torch.Tensor):
        """x [S, H] -> (logits, probs [S, E], indices, weights [S, k]) in fp32: forward's evaluation routing."""
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            logits = F.linear(x.float(), self.wg.weight.float())  # [S, E] fp32
            probs = torch.softmax(logits, dim=-1)  # [S, E]
            indices = self.select(logits, probs)  # [S, k]
            weights = probs.gather(1, indices)  # [S, k] fp32
        return logits, probs, indices, weights

    @staticmethod
    def balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's l_aux: over the first choices for k <= 2, over all k choices beyond."""
        if indices.shape[1] <= 2:
            return load_balancing_loss(probs, indices[:, 0])
        return topk_balancing_loss(probs, indices)

    @staticmethod
    def z_loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, dim=-1).square().mean()
