"""``--log-optimizer-states-to-tensorboard``: norms and largest magnitudes of the Adam state and weights.

For each of the second moment ``variance`` (exp_avg_sq), its square root ``variance_sqrt``, the
first moment ``momentum`` (exp_avg) and the ``weight``: the L2 norm, the L1 norm and the largest
absolute value over every parameter of the model, each element counted once — the scalars
Megatron-DeepSpeed writes as ``optimizer/<quantity>_l2``, ``_l1`` and ``_abs_max``.

The figures equal those of the whole, unsharded model at any layout: with the ZeRO-1 / ZeRO-2
optimizers each rank sums only its shard of each domain (dense over data parallel, experts over
expert-data parallel) and the domain's group adds the shards up; tensor-parallel shards are then
summed over the TP group (replicated parameters counted once) and experts over the EP group of their
layer's EP degree (PR-MoE layers with fewer experts than EP run at a lower degree, their other ranks being
replicas). Under FSDP2 (ZeRO-3) each rank sums its shards (DTensors) and the DP / EDP group adds them up, as for ZeRO.
Every rank must call :func:`optimizer_state_stats` (it runs collectives).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron.model.param_tags import is_expert, is_tp_sharded
from megatron.parallel.grad_sync import expert_degrees

QUANTITIES = ("variance", "variance_sqrt", "momentum", "weight")
# rows of the per-rank sums: (is expert, is TP-sharded)
_CATEGORIES = ((False, False), (False, True), (True, False), (True, True))


def _category(p) -> int:
    return _CATEGORIES.index((is_expert(p), is_tp_sharded(p)))


def _accumulate(sums: torch.Tensor, maxes: torch.Tensor, row: int, exp_avg, exp_avg_sq, weight) -> None:
    """Add one tensor set's squared sums and L1 sums (``sums[row]``: 4 + 4) and raise ``maxes`` (4)."""
    for i, t in enumerate((exp_avg_sq, None, exp_avg, weight)):
        if i == 1:
            t = exp_avg_sq.double().sqrt() if exp_avg_sq is not None else None
        if t is None or t.numel() == 0:
            continue
        t = t.detach().double()
        sums[row, i] += t.square().sum()
        sums[row, 4 + i] += t.abs().sum()
        maxes[i] = torch.maximum(maxes[i], t.abs().max())


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _expert_rows_over_ep(part: torch.Tensor, groups) -> None:
    """Sum the expert rows of ``part`` over the EP group of ``groups`` (ExpertGroups of one EP degree)."""
    if groups is not None and groups.ep_size > 1:
        rows = [i for i, (ex, _) in enumerate(_CATEGORIES) if ex]
        sub = part[rows].contiguous()
        dist.all_reduce(sub, group=groups.ep_group)
        part[rows] = sub


def _local_sums(optimizer, model, ps, dev):
    """(sums [4, 8], maxes [4]): this rank's sums with every expert counted once over its EP group (and every
    ZeRO / FSDP2 shard added up over its group); TP-sharded rows still per TP rank."""
    sums = torch.zeros(len(_CATEGORIES), 8, dtype=torch.float64, device=dev)
    maxes = torch.zeros(4, dtype=torch.float64, device=dev)
    domains = getattr(optimizer, "domains", None)
    if domains is None:  # torch AdamW: every replica holds the state of all its parameters
        degree, ep = expert_degrees(model), getattr(ps, "ep_size", 1)  # a trainer-less caller passes no groups
        degrees = sorted({degree.get(p, ep) for g in optimizer.param_groups for p in g["params"]
                          if is_expert(p)} | {ep})
        dense = torch.zeros_like(sums)  # FSDP2's shards, added up below
        experts = {e: torch.zeros_like(sums) for e in degrees}  # per EP degree: FSDP2 shards, then whole tensors
        whole = {e: torch.zeros_like(sums) for e in degrees}
        fsdp = any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
                e = degree.get(p, ep)
                if isinstance(p, DTensor):  # FSDP2: this rank's shard (dense over DP, experts over EDP)
                    _accumulate(experts[e] if is_expert(p) else dense, maxes, _category(p), _local(m), _local(v),
                                p.to_local())
                else:
                    _accumulate(whole[e] if is_expert(p) else sums, maxes, _category(p), m, v, p.data)
        if getattr(ps, "dp_size", 1) > 1 and fsdp:  # the same on every rank (structural), so the collective always matches
            dist.all_reduce(dense, group=ps.dp_group)
        sums += dense
        for e in degrees:
            groups = ps.expert_groups(e) if ps.distributed else None
            if groups is not None and groups.edp_size > 1 and fsdp:
                dist.all_reduce(experts[e], group=groups.edp_group)
            part = experts[e] + whole[e]
            _expert_rows_over_ep(part, groups)
            sums += part
        return sums, maxes
    for d in domains:  # ZeRO-1 / ZeRO-2: this rank's shard of each domain, added up over the domain's group
        part = torch.zeros_like(sums)
        for p, a, b, s in d.pieces:
            _accumulate(part, maxes, _category(p), d.exp_avg[s: s + b - a], d.exp_avg_sq[s: s + b - a],
                        p.data.reshape(-1)[a:b])
        if d.size > 1:
            dist.all_reduce(part, group=d.group)
        if ps.distributed:
            _expert_rows_over_ep(part, getattr(d, "experts", None))  # an expert domain: over its degree's EP group
        sums += part
    return sums, maxes


@torch.no_grad()
def optimizer_state_stats(optimizer, model, ps) -> dict[str, float]:
    """``optimizer/<quantity>_{l2,l1,abs_max}`` -> value, over the whole model (collective over all ranks)."""
    dev = next(model.parameters()).device
    sums, maxes = _local_sums(optimizer, model, ps, dev)
    if ps.distributed:
        tp_rows = [i for i, (_, tp) in enumerate(_CATEGORIES) if tp]
        if ps.tp_size > 1:
            part = sums[tp_rows].contiguous()
            dist.all_reduce(part, group=ps.tp_group)
            sums[tp_rows] = part
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=ps.world_group)
    total = sums.sum(0).tolist()
    out = {}
    for i, q in enumerate(QUANTITIES):
        out[f"optimizer/{q}_l2"] = math.sqrt(total[i])
        out[f"optimizer/{q}_l1"] = total[4 + i]
        out[f"optimizer/{q}_abs_max"] = float(maxes[i])
    return out
