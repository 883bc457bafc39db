"""The routing of today's MoE families, under Megatron-LM's flags, computed as transformers does.

Chosen automatically (``MoEConfig.__post_init__``) when any of these flags is set; the DeepSpeed top-k
router (``topk.py``) stays what runs otherwise:

- ``--moe-router-score-function softmax|sigmoid``: scores = softmax(logits) over the experts, or
  sigmoid(logits) per expert (DeepSeek-V3);
- the expert bias (``--moe-router-enable-expert-bias``, the ``megatron_aux_free`` variant): added to the
  scores for the choice only, the weights come from the unbiased scores (transformers' DeepSeek-V3
  ``e_score_correction_bias``; stepped after each optimizer step like the ``aux_free`` router's);
- group-limited routing (``--moe-router-num-groups G --moe-router-group-topk g``): the experts form G equal
  groups by id; each token keeps the g groups with the largest sum of their 2 best (biased) scores and
  chooses its experts there. transformers' DeepSeek-V3 sums the 2 best; Megatron-LM sums the top
  k / g: we follow transformers (import/export parity), they agree for DeepSeek-V3 (k 8, g 4);
- the k choices: top-k of the (biased, group-masked) scores; weights = the unbiased scores of the choices,
  divided by their sum when normalising (``--moe-router-norm-topk-prob``; by default Megatron-LM's rule:
  softmax without ``--moe-router-pre-softmax`` (Mixtral, Qwen3-MoE; Megatron-LM's softmax over the k top
  logits is the same number), sigmoid at k > 1 (DeepSeek-V3)), then times
  ``--moe-router-topk-scaling-factor``. ``--moe-router-pre-softmax`` alone: the softmax over all experts,
  not renormalised (Qwen2-MoE, OLMoE: norm_topk_prob False);
- the weights are final: a choice dropped for capacity loses its share, the kept ones are not
  renormalised (``renormalize_kept`` False, Megatron-LM's); under a capacity, ``--moe-token-drop-policy
  position`` keeps the earliest tokens, else the highest weights first (Megatron-LM's "probs");
- balancing loss (``--moe-router-load-balancing-type``, Megatron-LM's, weighted by ``--moe-aux-loss-coeff``):
  aux_loss (the default: E / k * sum_e mean_s p_se * count_e / S) or seq_aux_loss (the same per sequence,
  averaged; a call without sequence ids, e.g. the small-batch decode path, counts as one sequence) over p =
  the softmax scores, or the sigmoid scores normalised per token; none. The z-loss is the DeepSpeed
  router's (mean logsumexp(logits)^2);
- ``--moe-router-dtype fp64``: the routing in float64 (its outputs fp32); fp32 otherwise. The gate weight
  ``wg`` [E, H] is transformers' ``gate.weight``.

Shapes: S tokens, H hidden, E experts, k choices per token, G groups.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.moe.routers.aux_free import ExpertBiasBalancing
from megatron.model.moe.routers.base import Router
from megatron.model.moe.routing import Routing, sequence_balancing_loss, switch_balancing_loss


class MegatronRouter(Router):
    description = ("Megatron-LM / transformers routing: softmax or sigmoid scores, pre-softmax, top-k "
                   "normalisation and scaling, group-limited choice, Megatron-LM's balancing losses")
    plain_eval = True  # evaluation: route_plain (no jitter)
    renormalize_kept = False  # the weights are final
    wants_sequence_ids = True  # seq_aux_loss
    hf_router_type = None  # the self-contained export's Router does not reproduce it (the native classes do)

    @classmethod
    def num_parameters(cls, hidden_size: int, num_experts: int) -> int:
        return hidden_size * num_experts  # wg

    def __init__(self, hidden_size: int, num_experts: int, moe_cfg):
        super().__init__()
        self.num_experts, self.topk = num_experts, moe_cfg.topk
        self.sigmoid = moe_cfg.router_score_function == "sigmoid"
        norm = moe_cfg.router_norm_topk_prob
        if norm is None:  # Megatron-LM's rule
            norm = self.topk > 1 if self.sigmoid else not moe_cfg.router_pre_softmax
        self.normalize = bool(norm)
        self.scaling = moe_cfg.router_topk_scaling_factor
        self.num_groups, self.group_topk = moe_cfg.router_num_groups, moe_cfg.router_group_topk
        self.balancing = moe_cfg.router_load_balancing_type or "aux_loss"
        self.dtype = torch.float64 if moe_cfg.router_dtype == "fp64" else torch.float32
        self.jitter = moe_cfg.noisy_gate_policy == "Jitter"
        self.drop_policy = moe_cfg.token_drop_policy
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)  # kept in fp32
        self.expert_bias: Optional[torch.Tensor] = None  # the aux-free variant's [E]

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [S, E] -> the same with the experts outside each token's best ``group_topk`` groups at -inf."""
        S, E = choice.shape
        G = self.num_groups
        n = E // G
        group_scores = choice.view(S, G, n).topk(min(2, n), dim=-1).values.sum(dim=-1)  # [S, G]
        top_groups = torch.topk(group_scores, self.group_topk, dim=-1).indices  # [S, g]
        keep = torch.zeros(S, G, dtype=torch.bool, device=choice.device).scatter(1, top_groups, True)  # [S, G]
        return choice.masked_fill(~keep[:, :, None].expand(S, G, n).reshape(S, E), float("-inf"))  # [S, E]

    def _route(self, x: torch.Tensor, jitter: bool):
        """x [S, H] -> logits [S, E], probs [S, E] (the balancing loss's), indices [S, k], weights [S, k]."""
        xr = x.to(self.dtype)
        if jitter:
            xr = xr * torch.empty_like(xr).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        logits = F.linear(xr, self.wg.weight.to(self.dtype))  # [S, E]
        scores = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=-1)  # [S, E]
        choice = scores if self.expert_bias is None else scores + self.expert_bias.to(self.dtype)  # [S, E]
        if self.num_groups is not None:
            choice = self._limit_to_groups(choice)
        indices = torch.topk(choice, self.topk, dim=-1).indices  # [S, k], best first
        weights = scores.gather(1, indices)  # [S, k] unbiased
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling is not None:
            weights = weights * self.scaling
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if self.sigmoid else scores  # [S, E]
        return logits.float(), probs.float(), indices, weights.float()

    def forward(self, x: torch.Tensor, seq_ids: Optional[torch.Tensor] = None) -> Routing:
        # x: [S, H], seq_ids: [S] int64 or None -> Routing
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits, probs, indices, weights = self._route(x, self.training and self.jitter)
            aux = self.balancing_loss(probs, indices, seq_ids)
            z = self.z_loss(logits)
            counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)  # [E]
        return Routing(indices=indices, weights=weights, probs=probs, aux_loss=aux, z_loss=z, counts=counts)

    def route_plain(self, x: torch.Tensor):
        """x [S, H] -> (logits, probs [S, E], indices, weights [S, k]) in fp32: forward's evaluation routing."""
        autocast = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(device_type=x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            return self._route(x, jitter=False)

    def drop_priority(self, routing: Routing):
        """[S, k] keep-first key under a capacity: the earliest tokens (policy position) or the highest weights."""
        if self.drop_policy == "position":
            S, k = routing.indices.shape
            pos = torch.arange(S, 0, -1, device=routing.indices.device)  # [S] early = high
            return pos[:, None].expand(S, k)  # [S, k]
        return routing.weights  # [S, k]

    def balancing_loss(self, probs: torch.Tensor, indices: torch.Tensor,
                       seq_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[] the loss ``--moe-router-load-balancing-type`` names (1.0 when balanced; 0 for none)."""
        if self.balancing == "none":
            return probs.new_zeros(())
        if self.balancing == "seq_aux_loss" and seq_ids is not None:
            return sequence_balancing_loss(probs, indices, seq_ids)
        return switch_balancing_loss(probs, indices)

    @staticmethod
    def z_loss(logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, dim=-1).square().mean()


class MegatronAuxFreeRouter(ExpertBiasBalancing, MegatronRouter):
    description = "the Megatron-LM / transformers routing with the aux-loss-free expert bias (DeepSeek-V3)"

    def __init__(self, hidden_size: int, num_experts: int, moe_cfg):
        super().__init__(hidden_size, num_experts, moe_cfg)
        self._init_expert_bias(num_experts, moe_cfg)

    def forward(self, x: torch.Tensor, seq_ids: Optional[torch.Tensor] = None) -> Routing:
        return self._count_load(super().forward(x, seq_ids))
