"""The MoE layer (standard and Residual-MoE) that replaces a transformer layer's MLP.

route (a router from the registry) -> plan + dispatch (a token dispatcher) -> experts -> combine.
Inference calls with a few tokens (decoding) take the small-batch path instead (``small_batch.py``:
only the chosen experts run, on views of their weights); it gives the same outputs and applies only
where the regular path would drop nothing and every expert is local. The layer holds no communication:
it picks a local dispatcher (capacity or grouped, by ``--disable-moe-token-dropping``), and expert
parallelism installs the one ``--moe-token-dispatcher-type`` names (``megatron/parallel``) with
:meth:`MoELayer.set_dispatcher`. ``dispatch`` returns the metadata ``combine`` takes; nothing is kept
between the two on the layer, the plan or the dispatcher.

Today's families (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3): SwiGLU and bias-free experts (``gated``,
``bias``: the model's ``--swiglu`` / ``--disable-bias-linear``), expert width ``--moe-ffn-hidden-size``,
shared experts (``shared_experts.py``: ``--moe-shared-expert-intermediate-size``, ``--moe-shared-expert-gate``),
the Megatron-LM routing flags (``routers/megatron.py``, whose weights are final: ``Router.renormalize_kept``).

Shapes: B batch, T sequence, S = B*T tokens, H hidden, E experts (global), E_l local experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megatron.model.moe.capacity import expert_capacity
from megatron.model.moe.dispatchers import TokenDispatcher, local_dispatcher
from megatron.model.moe.experts import StackedExperts
from megatron.model.moe.metrics import MoEStats, router_entropy
from megatron.model.moe.routers import build_router
from megatron.model.moe.shared_experts import SharedExpertMLP
from megatron.model.moe.small_batch import small_batch_applies, small_batch_forward


class MoELayer(nn.Module):
    """``ffn_hidden_size``: the model's MLP width, the experts' unless ``--moe-ffn-hidden-size`` is set;
    ``gated``: SwiGLU experts and shared experts (``--swiglu``); ``bias``: biases in them
    (not ``--disable-bias-linear``); ``dense_mlp_factory``: Residual-MoE's dense MLP."""

    def __init__(self, moe_cfg, hidden_size: int, ffn_hidden_size: int, num_experts: int, layer_number: int,
                 ep_rank: int = 0, ep_size: int = 1, dense_mlp_factory=None, gated: bool = False, bias: bool = True):
        super().__init__()
        self.cfg = moe_cfg
        self.num_experts, self.layer_number = num_experts, layer_number
        self.topk = moe_cfg.topk
        self.ep_size = ep_size  # this layer's EP degree (PR-MoE: below --moe-expert-parallel-size when E < EP)
        self.router = build_router(hidden_size, num_experts, moe_cfg)
        num_local = num_experts // ep_size
        expert_ffn = getattr(moe_cfg, "moe_ffn_hidden_size", None) or ffn_hidden_size
        self.experts = StackedExperts(num_local, hidden_size, expert_ffn, first_expert=ep_rank * num_local,
                                      fuse_wgrad=moe_cfg.gradient_accumulation_fusion, gated=gated, bias=bias)
        shared = getattr(moe_cfg, "shared_expert_intermediate_size", None)
        self.shared_experts = SharedExpertMLP(hidden_size, shared, gated=gated, bias=bias,
                                              gate=getattr(moe_cfg, "shared_expert_gate", False)) if shared else None
        self.dispatcher: TokenDispatcher = local_dispatcher(num_experts, moe_cfg.token_dropping)
        self.small_batch = True  # False: always the dispatched path (benchmarks compare the two)
        self.residual = moe_cfg.mlp_type == "residual"
        if self.residual:
            self.residual_mlp = dense_mlp_factory()
            self.coefficient = nn.Linear(hidden_size, 2)

    def set_dispatcher(self, dispatcher: TokenDispatcher) -> None:
        """Replace the local dispatcher (expert parallelism installs its communicating one here)."""
        self.dispatcher = dispatcher

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert, or None when no token is dropped."""
        if not self.cfg.token_dropping:
            return None
        cf = self.cfg.train_capacity_factor if self.training else self.cfg.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, cf, self.cfg.min_capacity, self.topk)

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
        # hidden: [B, T, H] -> ([B, T, H], MoEStats)
        B, T, H = hidden.shape
        x = hidden.reshape(B * T, H)  # [S, H]
        if token_mask is not None:  # padding stays out of routing and capacity
            keep_idx = torch.nonzero(token_mask.reshape(-1), as_tuple=False).squeeze(1)  # [S']
            x = x.index_select(0, keep_idx)  # [S', H]
        S = x.shape[0]
        capacity = self.capacity(S)
        fast = small_batch_forward(self, x, capacity) if small_batch_applies(self, S) else None
        if fast is None:
            seq_ids = None
            if self.router.wants_sequence_ids:  # [S] the batch row of each token (per-sequence balancing)
                seq_ids = torch.arange(B, device=x.device).repeat_interleave(T)
                if token_mask is not None:
                    seq_ids = seq_ids.index_select(0, keep_idx)
            fast = self._dispatched(x, capacity, seq_ids)
        y, stats = fast  # [S, H] in x's dtype
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).to(y.dtype)  # [S, H]
        if self.residual:
            dense = self.residual_mlp(x)  # [S, H]
            coef = torch.softmax(self.coefficient(x).float(), dim=-1)  # [S, 2]
            y = (y.float() * coef[:, 0:1] + dense.float() * coef[:, 1:2]).to(hidden.dtype)
        if token_mask is not None:
            y = hidden.new_zeros(B * T, H).index_copy(0, keep_idx, y)
        return y.reshape(B, T, H), stats

    def _dispatched(self, x: torch.Tensor, capacity: Optional[int], seq_ids: Optional[torch.Tensor] = None):
        """The regular path: x [S, H] (seq_ids [S]: for a router that wants them) -> (y [S, H] in x's dtype,
        MoEStats)."""
        S = x.shape[0]
        routing = self.router(x, seq_ids) if seq_ids is not None else self.router(x)  # indices, weights [S, k]
        priority = self.router.drop_priority(routing) if capacity is not None else None  # [S, k] or None
        renormalize = self.topk > 1 and self.router.renormalize_kept
        plan = self.dispatcher.plan(routing, self.num_experts, capacity, priority, renormalize=renormalize)
        batch, meta = self.dispatcher.dispatch(x, plan)  # ExpertBatch [E_l, C', H] or [N_l, H]; combine's metadata
        expert_out = self.experts.run(batch)  # batch's layout
        y = self.dispatcher.combine(expert_out, meta).to(x.dtype)  # [S, H]
        share = self.dispatcher.loss_share  # 1/TP under sequence parallelism (each TP rank: its shard's losses)
        stats = MoEStats(layer=self.layer_number, aux_loss=routing.aux_loss * share, z_loss=routing.z_loss * share,
                         counts=routing.counts.detach().float(), dropped=plan.dropped.detach().float(),
                         assignments=torch.tensor(float(S * self.topk), device=x.device),
                         entropy=router_entropy(routing.probs))
        return y, stats
