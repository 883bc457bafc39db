"""The all-gather token dispatcher (``--moe-token-dispatcher-type allgather``, Megatron-LM's
MoEAllGatherTokenDispatcher): every EP rank sees every rank's tokens and runs its experts on those routed
to them.

Each rank plans its own tokens as the all-to-all dispatcher does (capacity agreed over the EP group, the
same kept assignments), then:

- dispatch: all-gathers over the EP group the tokens ([S, H], zero-padded to the largest S, so [ep * S_max, H])
  and their routing: with a capacity, each rank's slot -> token map and slot weights ([E * C]); without,
  its expert-sorted kept assignments (token and weight, [N] padded to the largest N) and per-expert
  counts. Each rank picks the rows routed to its E_l experts: with a capacity a zero-padded
  [E_l, ep * C, H] buffer (source rank j's slots at columns j*C ..), without the [N_l, H] rows sorted by
  local expert then source rank (the grouped kernel; no padding). Both are the layouts the all-to-all
  dispatcher hands its experts.
- combine: each rank weights its experts' output rows by their (gathered) combine weights, adds them into
  a [ep * S_max, H] buffer by token, and reduce-scatters it over the EP group, so each rank receives the
  sum over expert ranks for its own tokens.

Autograd: the tokens' all-gather has a reduce-scatter backward (each rank's input gradient sums every
expert rank's contribution), the weights' all-gather likewise (the router's gradient), and the output's
reduce-scatter an all-gather backward; the experts' gradients stay local. Under tensor parallelism the
picked rows are split over the TP ranks like the all-to-all dispatcher's (``token_split.py``: the buffer
along its slots, the rows into contiguous chunks) and their output gathered back before the combine; the
all-gather itself is not split (every TP rank gathers the same tokens).

The metadata :meth:`AllGatherDispatcher.dispatch` returns for ``combine`` is
:class:`AllGatherDispatchMetadata`.

Shapes: S tokens of this rank, S_max the largest S over the EP group, H hidden, E experts, E_l local
experts, C capacity, N kept assignments of a rank, R rows of this rank's experts (E_l * ep * C with a
capacity, N_l without), n this TP rank's share of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.model.moe.dispatchers import ExpertBatch
from megatron.parallel.collectives import (
    all_gather_rows,
    all_gather_values,
    chunk_length,
    gather_from_tp,
    reduce_scatter_rows,
    split_to_tp,
)
from megatron.parallel.ep_dispatch import ExpertParallelDispatcher
from megatron.parallel.token_split import chunk_counts


@dataclass(frozen=True)
class AllGatherDispatchMetadata:
    """What :meth:`AllGatherDispatcher.combine` needs to weight the experts' rows and send them home."""

    rows: torch.Tensor  # [R] row of the gathered tokens each expert row holds (ep * S_max: an empty slot)
    weight: torch.Tensor  # [R] fp32 combine weight of each expert row (0: an empty slot), gathered with autograd
    capacity: int  # C of the [E_l, ep * C, H] buffer; 0: no-drop rows
    num_tokens: int  # S: this rank's tokens
    padded_tokens: int  # S_max: rows each rank contributes to the gathered tokens


class AllGatherDispatcher(ExpertParallelDispatcher):
    def __init__(self, group, ep_size, num_experts, device, timer=None, tp=None):
        super().__init__(group, ep_size, num_experts, device, timer=timer, tp=tp)
        self.rank = dist.get_rank(group) if ep_size > 1 else 0  # this rank in the EP group

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:  # [n, ...] -> [ep * n, ...], with autograd
        return t if self.ep == 1 else all_gather_rows(t, self.group, self.ep, self.timer)

    def _gather_values(self, t: torch.Tensor) -> torch.Tensor:  # [n] -> [ep, n], no gradient
        return t[None] if self.ep == 1 else all_gather_values(t, self.group, self.ep, self.timer)

    def dispatch(self, x, plan):
        ep, E, E_l, r, tp = self.ep, self.num_experts, self.num_local, self.rank, self.tp
        S, H = x.shape
        mine = slice(r * E_l, (r + 1) * E_l)  # this rank's experts
        sizes = self._gather_values(torch.cat([plan.counts, plan.counts.new_tensor([S])]))  # [ep, E + 1]
        S_max = int(sizes[:, E].max())
        x_all = self._gather_rows(F.pad(x, (0, 0, 0, S_max - S)))  # [ep * S_max, H], rank j's at rows j*S_max ..
        if plan.capacity:
            C = plan.capacity
            slot_token = torch.full((E * C,), -1, dtype=torch.long, device=x.device).index_copy(
                0, plan.slot, plan.token)  # [E * C] token in each slot, -1: empty
            slot_weight = plan.weight.new_zeros(E * C).index_copy(0, plan.slot, plan.weight)  # [E * C]
            token = self._gather_values(slot_token).view(ep, E, C)[:, mine].transpose(0, 1)  # [E_l, ep, C]
            weight = self._gather_rows(slot_weight[None]).view(ep, E, C)[:, mine].transpose(0, 1)  # [E_l, ep, C]
            first = torch.arange(ep, device=x.device).view(1, ep, 1) * S_max  # [1, ep, 1] source's first row
            rows = torch.where(token >= 0, token + first, ep * S_max).reshape(-1)  # [R], R = E_l * ep * C
            src = torch.cat([x_all, x_all.new_zeros(1, H)])  # [ep * S_max + 1, H]: a zero row for empty slots
            tokens = src.index_select(0, rows).view(E_l, ep * C, H)  # [E_l, ep * C, H]
            if tp:
                tokens = split_to_tp(tokens, 1, tp.group, tp.rank, tp.size)  # [E_l, c, H], c = ceil(ep * C / TP)
            meta = AllGatherDispatchMetadata(rows, weight.reshape(-1), C, S, S_max)
            return ExpertBatch(tokens), meta
        counts_all = sizes[:, :E]  # [ep, E] kept assignments of each rank per expert
        N, N_max = plan.token.numel(), int(counts_all.sum(1).max())
        token = self._gather_values(F.pad(plan.token, (0, N_max - N)))  # [ep, N_max] sorted by expert
        weight = self._gather_rows(F.pad(plan.weight, (0, N_max - N))[None])  # [ep, N_max]
        pos = torch.arange(N_max, device=x.device).expand(ep, N_max).contiguous()  # [ep, N_max]
        expert = torch.searchsorted(torch.cumsum(counts_all, 1), pos, right=True)  # [ep, N_max] (E: padding)
        local = (expert - r * E_l).reshape(-1)  # [ep * N_max]
        picked = torch.nonzero((local >= 0) & (local < E_l)).squeeze(1)  # [N_l] source rank, then expert
        picked = picked[torch.argsort(local[picked], stable=True)]  # [N_l] local expert, then source rank
        rows = token.reshape(-1)[picked] + torch.div(picked, N_max, rounding_mode="floor") * S_max  # [N_l]
        counts = counts_all[:, mine].sum(0)  # [E_l]
        tokens = x_all.index_select(0, rows)  # [N_l, H]
        if tp:  # this TP rank's contiguous chunk of the sorted rows
            counts = chunk_counts(counts, tp.rank, tp.size)  # [E_l]
            tokens = split_to_tp(tokens, 0, tp.group, tp.rank, tp.size)[: int(counts.sum())]  # [n, H]
        meta = AllGatherDispatchMetadata(rows, weight.reshape(-1)[picked], 0, S, S_max)
        return ExpertBatch(tokens, counts), meta  # [n, H], [E_l]

    def combine(self, expert_out, metadata: AllGatherDispatchMetadata):
        ep, tp, meta = self.ep, self.tp, metadata
        R = meta.rows.numel()
        out = expert_out  # [E_l, c, H] or [n, H]
        if tp and meta.capacity:
            out = gather_from_tp(out, 1, ep * meta.capacity, tp.group, tp.rank, tp.size)  # [E_l, ep * C, H]
        elif tp:
            c = chunk_length(R, tp.size)
            out = F.pad(out, (0, 0, 0, c - out.shape[0]))  # [c, H]: the chunk's padding rows back
            out = gather_from_tp(out, 0, R, tp.group, tp.rank, tp.size)  # [N_l, H]
        H = out.shape[-1]
        flat = out.reshape(R, H)  # [R, H]
        picked = flat * meta.weight.to(flat.dtype)[:, None]  # [R, H]
        y_all = flat.new_zeros(ep * meta.padded_tokens + 1, H).index_add(0, meta.rows, picked)  # [ep * S_max + 1, H]
        y_all = y_all[:-1]  # [ep * S_max, H] (the empty slots' row dropped)
        y = y_all if ep == 1 else reduce_scatter_rows(y_all, self.group, ep, self.timer)  # [S_max, H]
        return y[: meta.num_tokens]  # [S, H]
