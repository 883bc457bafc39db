"""The small-batch MoE path for inference: route a few tokens, then run only the chosen experts.

Decoding calls an MoE layer with one token per running request. The regular path (plan, dispatch,
grouped experts, combine) is built for thousands of tokens: its sort, its per-expert slicing of
every expert and its combine cost far more than the few matmuls a handful of tokens need. Here the
layer routes exactly as the router does in evaluation, groups the assignments by expert on the host
(one small copy of the [S, k] choices), and for each distinct chosen expert runs one ``addmm`` pair
on views of its weights (``w1[e]``: no copies) over its rows of one expert-sorted gather, then adds the
gate-weighted outputs back per token (one scatter).

When it applies (:func:`small_batch_applies`; ``MoELayer.small_batch = False`` turns it off), and why
the results equal the regular path's:
- evaluation under ``torch.no_grad()`` (serving, generation, scoring): training-only routing
  (gate noise, random token selection, second-expert sampling) never runs here;
- at most :data:`MAX_ASSIGNMENTS` assignments (tokens x k) in the call;
- every expert is on this rank and no peer routes other tokens through the dispatcher (under expert
  parallelism the all-to-all must run on every rank, so the path is off there; tensor-parallel peers
  route the same tokens, so they all take the same path);
- the router's evaluation routing is plain (its class's ``plain_eval``: softmax, select, gather), so
  :meth:`~megatron.model.moe.routers.base.Router.route_plain` reproduces it;
- with a capacity (``--moe-eval-capacity-factor``), only when no expert receives more assignments
  than its capacity: then the regular path drops nothing either, and its weights (renormalised over
  the kept choices) equal the no-drop ones. Otherwise :func:`small_batch_forward` returns None and the
  caller runs the regular path.
The layer's statistics (aux and z loss, per-expert counts) are computed when first read, from the
same routing, with the router's own formulas; nothing is dropped on this path.

Shapes: S tokens, H hidden, F expert hidden, E experts, k choices per token, n rows of one expert.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron.model.moe.experts import compute_dtype
from megatron.model.moe.metrics import MoEStats, router_entropy

# Assignments (tokens x k) up to which the path is used: one decode step of a batch of up to 64 rows
# at top-1 (32 at top-2). Measured with tools/bench/moe_decode.py (docs/PERFORMANCE.md).
MAX_ASSIGNMENTS = 64


def small_batch_applies(layer, num_tokens: int) -> bool:
    """Whether ``layer`` (an MoELayer) may take the small-batch path for a call of ``num_tokens`` tokens."""
    return (layer.small_batch and not layer.training and not torch.is_grad_enabled()
            and 0 < num_tokens * layer.topk <= MAX_ASSIGNMENTS
            and layer.experts.num_local == layer.num_experts
            and not layer.dispatcher.peers_route_other_tokens
            and layer.router.plain_eval)


class LazyMoEStats(MoEStats):
    """MoEStats whose losses and counts are computed from the routing only when read (decoding never reads them)."""

    def __init__(self, layer: int, router, logits: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor,
                 num_experts: int, loss_share: float = 1.0):
        self.layer, self._router, self._share = layer, router, loss_share  # share: TokenDispatcher.loss_share
        self._logits, self._probs, self._indices, self._num_experts = logits, probs, indices, num_experts

    @property
    def dropped(self) -> torch.Tensor:
        return torch.zeros((), device=self._indices.device)

    @property
    def assignments(self) -> torch.Tensor:
        return torch.tensor(float(self._indices.numel()), device=self._indices.device)

    @property
    def aux_loss(self) -> torch.Tensor:
        return self._router.balancing_loss(self._probs, self._indices) * self._share

    @property
    def z_loss(self) -> torch.Tensor:
        return self._router.z_loss(self._logits) * self._share

    @property
    def counts(self) -> torch.Tensor:
        return torch.bincount(self._indices.reshape(-1), minlength=self._num_experts).float()  # [E]

    @property
    def entropy(self) -> torch.Tensor:
        return router_entropy(self._probs)


def small_batch_forward(layer, x: torch.Tensor, capacity: Optional[int]):
    """x [S, H] -> (y [S, H] in x's dtype, LazyMoEStats), or None when ``capacity`` would drop a choice."""
    S = x.shape[0]
    logits, probs, indices, weights = layer.router.route_plain(x)  # [S, E], [S, E], [S, k], [S, k] fp32
    k = indices.shape[1]
    groups: dict[int, list[tuple[int, int]]] = {}  # expert -> its (token, choice) assignments, token order
    for s, row in enumerate(indices.tolist()):  # the one host copy: S x k ints
        for j, e in enumerate(row):
            groups.setdefault(e, []).append((s, j))
    if capacity is not None and max(len(g) for g in groups.values()) > capacity:
        return None
    if k > 1 and layer.router.renormalize_kept:  # renormalise over the chosen experts (nothing is dropped here)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    experts, dt = layer.experts, compute_dtype(x)  # the experts follow --bf16 / --fp16 autocast, as grouped ones do
    xc = x.to(dt)
    order = sorted(groups)  # ascending expert id: each token sums its choices in the dispatched path's order
    if len(order) == 1 and k == 1:  # every token to one expert (always so for one token at top-1)
        y = experts.expert_forward(order[0], xc) * weights.to(dt)  # [S, H]
    else:
        members = [m for e in order for m in groups[e]]  # [N] (token, choice), grouped by expert
        picks = torch.tensor([[t for t, _ in members], [t * k + j for t, j in members]], device=x.device)  # [2, N]
        xs = xc.index_select(0, picks[0])  # [N, H] rows grouped by expert
        outs, first = [], 0
        for e in order:
            n = len(groups[e])
            outs.append(experts.expert_forward(e, xs[first:first + n]))  # [n, H]
            first += n
        out = torch.cat(outs) * weights.reshape(-1).index_select(0, picks[1]).to(dt)[:, None]  # [N, H]
        y = out.new_zeros(S, x.shape[1]).index_add_(0, picks[0], out)  # [S, H]
    stats = LazyMoEStats(layer.layer_number, layer.router, logits, probs, indices, layer.num_experts,
                         layer.dispatcher.loss_share)
    return y.to(x.dtype), stats
