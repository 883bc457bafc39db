"""Expert parallelism applied from outside the model: the token dispatchers' registry and the all-to-all one.

Each rank holds E_l = E / ep experts (global ids r*E_l .. (r+1)*E_l - 1 on EP rank r), ``ep`` the layer's EP
degree (PR-MoE: ``min(--moe-expert-parallel-size, E)``, each layer exchanging over its degree's EP group).
:func:`apply_expert_parallel` installs in every MoE layer the dispatcher its ``--moe-token-dispatcher-type``
names in :data:`TOKEN_DISPATCHERS`: ``alltoall`` (:class:`AllToAllDispatcher`, the default) or ``allgather``
(``allgather_dispatcher.py``). Both plan like the local dispatchers (``ep_dispatch.py``: the capacity
agreed over the EP group). The all-to-all one then exchanges tokens over the EP group:

- with a capacity (token dropping): capacity is agreed (MAX) across the EP group, then the
  [E, C, H] buffer is exchanged with one equal-split all-to-all so that each rank receives
  [E_l, ep * C, H] for its experts, and the output goes back the same way;
- without (no drop): each rank sends only the rows its tokens routed to each expert. The
  per-expert counts are exchanged first (all-to-all of [ep, E_l] counts), then the rows with a
  variable-size all-to-all; the receiver sorts them by local expert and runs the grouped kernel
  (no padding to the largest demand).

``dispatch`` returns :class:`AllToAllDispatchMetadata`, what ``combine`` needs to send the output back.

Under tensor parallelism (TP > 1) the dispatcher also splits the routed tokens over the TP ranks
before the exchange and all-gathers the experts' output after it (``token_split``: the paper's
parallelism-coordinated communication), so each TP rank sends and computes 1/TP of them; with EP = 1
it is installed for that alone. The capacity buffer is split along C, the no-drop rows (sorted by
expert) into contiguous chunks.

Parameter names do not change, so checkpoints are layout-independent.

Timing: :func:`time_exchanges` gives the dispatchers a timer (any context manager) that every
exchange (forward and backward) and the capacity all-reduce run inside; the training loop reports it as
``all-to-all``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
import torch.nn.functional as F

from megatron.errors import UserError
from megatron.model.moe.dispatchers import (
    ExpertBatch,
    LocalDispatchMetadata,
    local_dispatcher,
    scatter_to_capacity,
    weighted_combine,
)
from megatron.model.moe.layer import MoELayer
from megatron.parallel.allgather_dispatcher import AllGatherDispatcher
from megatron.parallel.collectives import all_to_all, chunk_length, gather_from_tp, split_to_tp
from megatron.parallel.ep_dispatch import ExpertParallelDispatcher, TPSplit
from megatron.parallel.token_split import chunk_counts


@dataclass(frozen=True)
class AllToAllDispatchMetadata:
    """What :meth:`AllToAllDispatcher.combine` needs to bring the experts' output back and combine it."""

    local: LocalDispatchMetadata  # this rank's kept assignments: rows of its [E, C, H] / [N, H] layout
    capacity: int  # C of the [E, C, H] buffer; 0: no-drop rows
    send_splits: tuple = ()  # no-drop, EP > 1: rows sent to each EP rank
    recv_splits: tuple = ()  # no-drop, EP > 1: rows received from each EP rank
    order: Optional[torch.Tensor] = None  # no-drop, EP > 1: [N_l] received rows sorted by local expert


class AllToAllDispatcher(ExpertParallelDispatcher):
    def dispatch(self, x, plan):
        ep, E_l, tp = self.ep, self.num_local, self.tp
        local = LocalDispatchMetadata.of(plan, x.shape[0])
        if plan.capacity:
            meta = AllToAllDispatchMetadata(local, plan.capacity)
            buf = scatter_to_capacity(x, plan, self.num_experts)  # [E, C, H], rank j's experts at rows j*E_l..
            if tp:
                buf = split_to_tp(buf, 1, tp.group, tp.rank, tp.size)  # [E, c, H], c = ceil(C / TP)
            if ep == 1:
                return ExpertBatch(buf), meta
            E, C, H = buf.shape
            recv = all_to_all(buf.reshape(ep, E_l * C * H), self.group, timer=self.timer)  # [ep(src), E_l*C*H]
            return ExpertBatch(recv.view(ep, E_l, C, H).transpose(0, 1).reshape(E_l, ep * C, H)), meta  # [E_l, ep*C, H]
        rows, counts = x.index_select(0, plan.token), plan.counts  # [N, H] sorted by global expert, [E]
        if tp:  # this TP rank's contiguous chunk of the sorted rows
            counts = chunk_counts(counts, tp.rank, tp.size)  # [E]
            rows = split_to_tp(rows, 0, tp.group, tp.rank, tp.size)[: int(counts.sum())]  # [n, H]
        if ep == 1:
            return ExpertBatch(rows, counts), AllToAllDispatchMetadata(local, 0)
        send_counts = counts.view(ep, E_l)  # [ep(dst), E_l]
        recv_counts = all_to_all(send_counts.contiguous(), self.group, timer=self.timer)  # [ep(src), E_l]
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        recv = all_to_all(rows, self.group, recv_splits, send_splits, self.timer)  # [N_l, H] by source rank, then expert
        local_expert = torch.arange(E_l, device=x.device).repeat(ep)  # [ep * E_l]
        expert_of_row = torch.repeat_interleave(local_expert, recv_counts.reshape(-1))  # [N_l]
        order = torch.argsort(expert_of_row, stable=True)  # [N_l]
        meta = AllToAllDispatchMetadata(local, 0, tuple(send_splits), tuple(recv_splits), order)
        return ExpertBatch(recv.index_select(0, order), recv_counts.sum(0)), meta  # [N_l, H], [E_l]

    def combine(self, expert_out, metadata: AllToAllDispatchMetadata):
        ep, E_l, tp, meta = self.ep, self.num_local, self.tp, metadata
        if meta.capacity:
            back = expert_out  # [E, c, H] when ep == 1
            if ep > 1:
                _, epC, H = expert_out.shape  # [E_l, ep*c, H]
                C = epC // ep
                send = expert_out.view(E_l, ep, C, H).transpose(0, 1).reshape(ep, E_l * C * H)  # [ep(dst), ...]
                back = all_to_all(send, self.group, timer=self.timer).view(ep * E_l, C, H)  # [E, c, H]
            if tp:
                back = gather_from_tp(back, 1, meta.capacity, tp.group, tp.rank, tp.size)  # [E, C, H]
            return weighted_combine(back, meta.local)  # [S, H]
        back = expert_out  # [n, H] when ep == 1
        if ep > 1:
            by_source = torch.empty_like(expert_out).index_copy(0, meta.order, expert_out)  # [N_l, H] source order
            back = all_to_all(by_source, self.group, list(meta.send_splits), list(meta.recv_splits),
                              self.timer)  # [n, H] by expert
        if tp:
            N = meta.local.token.numel()
            c = chunk_length(N, tp.size)
            back = F.pad(back, (0, 0, 0, c - back.shape[0]))  # [c, H]: the chunk's padding rows back
            back = gather_from_tp(back, 0, N, tp.group, tp.rank, tp.size)  # [N, H] sorted by global expert
        return weighted_combine(back, meta.local)  # [S, H]


# --moe-token-dispatcher-type: name -> factory(group, ep_size, num_experts, device, tp=TPSplit or None)
TOKEN_DISPATCHERS = {"alltoall": AllToAllDispatcher, "allgather": AllGatherDispatcher}


def apply_expert_parallel(model: torch.nn.Module, ps) -> None:
    """Install in every MoE layer of ``model`` the dispatcher over the EP group of the layer's EP degree
    (``module.ep_size``: ``min(--moe-expert-parallel-size, E)``, :meth:`ParallelState.expert_groups`) that its
    ``--moe-token-dispatcher-type`` names (:data:`TOKEN_DISPATCHERS`), splitting the routed tokens over the
    TP ranks when ``ps.tp_token_split`` (TP > 1; with EP = 1: the split alone). A layer at EP degree 1
    without the TP split keeps a local dispatcher (no exchange; its other ranks are EDP replicas). Under
    sequence parallelism every dispatcher weighs its balancing losses 1/TP (``TokenDispatcher.loss_share``)."""
    tp = TPSplit(ps.tp_group, ps.tp_rank, ps.tp_size) if ps.tp_token_split else None
    # sequence parallelism: each TP rank routes its own sequence shard
    share = 1.0 / ps.tp_size if getattr(ps, "sequence_parallel", False) else 1.0
    if ps.ep_size == 1 and tp is None and share == 1.0:
        return
    for module in model.modules():
        if isinstance(module, MoELayer):
            name = module.cfg.token_dispatcher_type
            if name not in TOKEN_DISPATCHERS:
                raise UserError(f"--moe-token-dispatcher-type must be one of {', '.join(TOKEN_DISPATCHERS)} "
                                f"(got {name!r})")
            g = ps.expert_groups(module.ep_size)  # this layer's EP degree (PR-MoE: E < EP runs at EP = E)
            if g.ep_size == 1 and tp is None:  # no exchange: a local dispatcher (sequence parallelism's share)
                module.set_dispatcher(local_dispatcher(module.num_experts, module.cfg.token_dropping, share))
                continue
            dispatcher = TOKEN_DISPATCHERS[name](g.ep_group, g.ep_size, module.num_experts, ps.device, tp=tp)
            dispatcher.loss_share = share
            module.set_dispatcher(dispatcher)


def time_exchanges(model: torch.nn.Module, timer: Optional[ContextManager]) -> int:
    """Run every EP exchange of ``model``'s expert-parallel dispatchers (all-to-all, or all-gather and
    reduce-scatter) inside ``timer``; returns how many dispatchers took it (0 without expert or tensor
    parallelism; a TP-only dispatcher has no EP exchange, and the TP split's all-gathers are not timed)."""
    n = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and isinstance(module.dispatcher, ExpertParallelDispatcher):
            module.dispatcher.set_timer(timer)
            n += 1
    return n
