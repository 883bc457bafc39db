"""After each optimizer step: update the balancing routers' biases from loads summed over replicas.

A balancing router is one whose class sets ``balances_after_step`` (the aux-loss-free router): it
keeps a ``pending_load`` [E] buffer and applies ``update_bias(load)``.

Every data-parallel replica of a router must apply the same update, so the per-expert loads each
rank saw since the last step are summed over ``ps.dp_group`` (the ranks that hold a replica of the
router's dense weights; expert-parallel peers route different tokens and are in it, tensor-parallel
peers route the same tokens and are not) before the update; under sequence parallelism the tensor-parallel
peers route their own sequence shards, so the loads are summed over ``ps.tp_group`` too.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.model.moe.routers import Router


def balancing_routers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, Router) and m.balances_after_step]


def update_router_biases(model: torch.nn.Module, ps) -> None:
    """Sum every balancing router's pending load over DP (one all-reduce) and update its bias."""
    routers = balancing_routers(model)
    if not routers:
        return
    loads = torch.cat([r.pending_load for r in routers])  # [sum of E]
    if ps.distributed and ps.dp_size > 1:
        dist.all_reduce(loads, group=ps.dp_group)
    if getattr(ps, "sequence_parallel", False):
        dist.all_reduce(loads, group=ps.tp_group)
    for r, load in zip(routers, torch.split(loads, [r.pending_load.numel() for r in routers])):
        r.update_bias(load)
