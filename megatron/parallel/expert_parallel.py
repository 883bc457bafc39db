"""Expert parallelism applied from outside the model: the all-to-all token dispatcher.

Each rank holds E_l = E / ep experts (global ids r*E_l .. (r+1)*E_l - 1 on EP rank r).
:func:`apply_expert_parallel` installs an :class:`AllToAllDispatcher` in every MoE layer. It
plans like the local dispatchers and then exchanges tokens over the EP group:

- with a capacity (token dropping): capacity is agreed (MAX) across the EP group, then the
  [E, C, H] buffer is exchanged with one equal-split all-to-all so that each rank receives
  [E_l, ep * C, H] for its experts, and the output goes back the same way;
- without (no drop): each rank sends only the rows its tokens routed to each expert. The
  per-expert counts are exchanged first (all-to-all of [ep, E_l] counts), then the rows with a
  variable-size all-to-all; the receiver sorts them by local expert and runs the grouped kernel
  (no padding to the largest demand).

Under tensor parallelism (TP > 1) the dispatcher also splits the routed tokens over the TP ranks
before the exchange and all-gathers the experts' output after it (``token_split``: the paper's
parallelism-coordinated communication), so each TP rank sends and computes 1/TP of them; with EP = 1
it is installed for that alone. The capacity buffer is split along C, the no-drop rows (sorted by
expert) into contiguous chunks.

Parameter names do not change, so checkpoints are layout-independent.

Timing: :func:`time_exchanges` gives the dispatchers a timer (any context manager) that every
all-to-all (forward and backward) and the capacity all-reduce run inside; the training loop reports it as
``all-to-all``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.model.moe.dispatch import DispatchPlan
from megatron.model.moe.dispatchers import ExpertBatch, TokenDispatcher, scatter_to_capacity, weighted_combine
from megatron.model.moe.layer import MoELayer
from megatron.parallel.collectives import chunk_length, gather_from_tp, split_to_tp
from megatron.parallel.token_split import chunk_counts


class _AllToAll(torch.autograd.Function):
    """Autograd-aware all_to_all_single along dim 0 with split sizes (its backward swaps them)."""

    @staticmethod
    def forward(ctx, group, x, out_splits, in_splits, timer):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.timer = group, out_splits, in_splits, timer
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        with timer or contextlib.nullcontext():
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows = grad.shape[0] if ctx.in_splits is None else sum(ctx.in_splits)
        out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
        with ctx.timer or contextlib.nullcontext():
            dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return None, out, None, None, None


def all_to_all(x: torch.Tensor, group, out_splits=None, in_splits=None,
               timer: Optional[ContextManager] = None) -> torch.Tensor:
    """Rows of x go to the ranks of ``group`` in blocks of ``in_splits`` (equal blocks when None);
    the exchange (and its backward) runs inside ``timer`` when one is given."""
    return _AllToAll.apply(group, x, out_splits, in_splits, timer)


@dataclass
class _Exchange:
    """What the no-drop path needs to send expert outputs back."""

    send_splits: list  # rows sent to each EP rank
    recv_splits: list  # rows received from each EP rank
    order: torch.Tensor  # [N_l] received rows sorted by local expert (a permutation)


@dataclass
class TPSplit:
    """The TP group the routed tokens are split over (each TP rank routes the same tokens)."""

    group: object
    rank: int
    size: int


class AllToAllDispatcher(TokenDispatcher):
    def __init__(self, group, ep_size: int, num_experts: int, device, timer: Optional[ContextManager] = None,
                 tp: Optional[TPSplit] = None):
        self.group, self.ep, self.num_experts, self.device = group, ep_size, num_experts, device
        self.num_local = num_experts // ep_size
        self.timer = timer
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.peers_route_other_tokens = ep_size > 1  # TP peers route the same tokens

    def set_timer(self, timer: Optional[ContextManager]) -> None:
        """Every exchange from now on (the all-to-alls and the capacity agreement) runs inside ``timer``
        (None: untimed)."""
        self.timer = timer

    def plan(self, routing, num_experts, capacity, priority, renormalize) -> DispatchPlan:
        if capacity is not None and self.ep > 1:  # ranks must agree on the buffer shape
            t = torch.tensor([capacity], dtype=torch.int64, device=self.device)
            with self.timer or contextlib.nullcontext():
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            capacity = int(t.item())
        return super().plan(routing, num_experts, capacity, priority, renormalize)

    def dispatch(self, x, plan):
        ep, E_l, tp = self.ep, self.num_local, self.tp
        if plan.capacity:
            buf = scatter_to_capacity(x, plan, self.num_experts)  # [E, C, H], rank j's experts at rows j*E_l..
            if tp:
                buf = split_to_tp(buf, 1, tp.group, tp.rank, tp.size)  # [E, c, H], c = ceil(C / TP)
            if ep == 1:
                return ExpertBatch(buf)
            E, C, H = buf.shape
            recv = all_to_all(buf.reshape(ep, E_l * C * H), self.group, timer=self.timer)  # [ep(src), E_l*C*H]
            return ExpertBatch(recv.view(ep, E_l, C, H).transpose(0, 1).reshape(E_l, ep * C, H))  # [E_l, ep*C, H]
        rows, counts = x.index_select(0, plan.token), plan.counts  # [N, H] sorted by global expert, [E]
        if tp:  # this TP rank's contiguous chunk of the sorted rows
            counts = chunk_counts(counts, tp.rank, tp.size)  # [E]
            rows = split_to_tp(rows, 0, tp.group, tp.rank, tp.size)[: int(counts.sum())]  # [n, H]
        if ep == 1:
            return ExpertBatch(rows, counts)
        send_counts = counts.view(ep, E_l)  # [ep(dst), E_l]
        recv_counts = all_to_all(send_counts.contiguous(), self.group, timer=self.timer)  # [ep(src), E_l]
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        recv = all_to_all(rows, self.group, recv_splits, send_splits, self.timer)  # [N_l, H] by source rank, then expert
        local_expert = torch.arange(E_l, device=x.device).repeat(ep)  # [ep * E_l]
        expert_of_row = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))  # [N_l]
        order = torch.argsort(expert_of_row, stable=True)  # [N_l]
        plan.exchange = _Exchange(send_splits, recv_splits, order)
        return ExpertBatch(recv.index_select(0, order), recv_counts.sum(0))  # [N_l, H], [E_l]

    def combine(self, expert_out, plan, num_tokens):
        ep, E_l, tp = self.ep, self.num_local, self.tp
        if plan.capacity:
            back = expert_out  # [E, c, H] when ep == 1
            if ep > 1:
                _, epC, H = expert_out.shape  # [E_l, ep*c, H]
                C = epC // ep
                send = expert_out.view(E_l, ep, C, H).transpose(0, 1).reshape(ep, E_l * C * H)  # [ep(dst), ...]
                back = all_to_all(send, self.group, timer=self.timer).view(ep * E_l, C, H)  # [E, c, H]
            if tp:
                back = gather_from_tp(back, 1, plan.capacity, tp.group, tp.rank, tp.size)  # [E, C, H]
            return weighted_combine(back, plan, num_tokens)
        back = expert_out  # [n, H] when ep == 1
        if ep > 1:
            ex = plan.exchange
            by_source = torch.empty_like(expert_out).index_copy(0, ex.order, expert_out)  # [N_l, H] source order
            back = all_to_all(by_source, self.group, ex.send_splits, ex.recv_splits, self.timer)  # [n, H] by expert
        if tp:
            N = plan.token.numel()
            c = chunk_length(N, tp.size)
            back = F.pad(back, (0, 0, 0, c - back.shape[0]))  # [c, H]: the chunk's padding rows back
            back = gather_from_tp(back, 0, N, tp.group, tp.rank, tp.size)  # [N, H] sorted by global expert
        return weighted_combine(back, plan, num_tokens)


def apply_expert_parallel(model: torch.nn.Module, ps) -> None:
    """Install the all-to-all dispatcher over ``ps.ep_group`` in every MoE layer of ``model``, splitting the
    routed tokens over the TP ranks when ``ps.tp_token_split`` (TP > 1; with EP = 1: the split alone)."""
    tp = TPSplit(ps.tp_group, ps.tp_rank, ps.tp_size) if ps.tp_token_split else None
    if ps.ep_size == 1 and tp is None:
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.set_dispatcher(AllToAllDispatcher(ps.ep_group, ps.ep_size, module.num_experts, ps.device, tp=tp))


def time_exchanges(model: torch.nn.Module, timer: Optional[ContextManager]) -> int:
    """Run every all-to-all of ``model``'s expert-parallel dispatchers inside ``timer``; returns how many
    dispatchers took it (0 without expert or tensor parallelism; a TP-only dispatcher has no all-to-all, and
    the TP split's all-gathers are not timed)."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.dispatcher, AllToAllDispatcher):
            module.dispatcher.set_timer(timer)
            n += 1
    return n
