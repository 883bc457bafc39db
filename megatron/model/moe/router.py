"""Top-k gate in fp32 (DeepSpeed's TopKGate) with DeepSpeed's load-balancing loss.

Shapes: S tokens, E experts, k choices per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    indices: torch.Tensor  # [S, k] int64 expert of each choice, best first
    weights: torch.Tensor  # [S, k] fp32 gate probability of each choice (not renormalised)
    probs: torch.Tensor  # [S, E] fp32 softmax over experts
    aux_loss: torch.Tensor  # [] E * sum_e mean_s(p_e) * frac_e(first choice); 1.0 when balanced
    z_loss: torch.Tensor  # [] mean_s logsumexp(logits)^2
    counts: torch.Tensor  # [E] demand per expert (all k choices) before dropping


def load_balancing_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's l_aux = E * sum_e mean_s(probs[:, e]) * mean_s(first_choice == e)."""
    num_experts = probs.shape[1]
    me = probs.mean(dim=0)  # [E]
    ce = torch.bincount(first_choice, minlength=num_experts).to(probs.dtype) / first_choice.numel()  # [E]
    return num_experts * torch.sum(me * ce)


def gumbel_like(t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    u = torch.rand(t.shape, device=t.device, dtype=t.dtype, generator=generator)
    return -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, topk: int = 1, noisy_gate_policy: Optional[str] = None,
                 second_expert_sampling: bool = True):
        super().__init__()
        self.num_experts, self.topk = num_experts, topk
        self.noisy_gate_policy = noisy_gate_policy
        self.second_expert_sampling = second_expert_sampling
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)  # kept in fp32

    def forward(self, x: torch.Tensor) -> Routing:
        # x: [S, H] -> Routing
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            if self.training and self.noisy_gate_policy == "Jitter":
                xf = xf * torch.empty_like(xf).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
            logits = F.linear(xf, self.wg.weight.float())  # [S, E]
            probs = torch.softmax(logits, dim=-1)  # [S, E]
            if self.topk == 1:
                if self.training and self.noisy_gate_policy == "RSample":
                    first = torch.argmax(logits + gumbel_like(logits), dim=-1)  # [S]
                else:
                    first = torch.argmax(probs, dim=-1)  # [S]
                indices = first[:, None]  # [S, 1]
            elif self.topk == 2 and self.training and self.second_expert_sampling:
                first = torch.argmax(probs, dim=-1)  # [S]
                masked = (logits + gumbel_like(logits)).scatter(1, first[:, None], float("-inf"))
                second = torch.argmax(masked, dim=-1)  # [S] 2nd expert by Gumbel sampling (training only)
                indices = torch.stack([first, second], dim=1)  # [S, 2]
            else:
                indices = torch.topk(probs, self.topk, dim=-1).indices  # [S, k]
            weights = probs.gather(1, indices)  # [S, k]
            aux = load_balancing_loss(probs, indices[:, 0])
            z = torch.logsumexp(logits, dim=-1).square().mean()
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)  # [E]
        return Routing(indices=indices, weights=weights, probs=probs, aux_loss=aux, z_loss=z, counts=counts)
