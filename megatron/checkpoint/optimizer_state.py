"""Adam state by parameter: how a checkpoint takes it from an optimizer and gives it back.

Checkpoints store optimizer state per parameter (``exp_avg``, ``exp_avg_sq``, ``step``), independent of
the optimizer's own index-based ``state_dict`` and of how ZeRO-1 shards it, so a checkpoint loads into
any data-parallel layout.
"""
from __future__ import annotations

import torch


def state_by_param(optimizer) -> dict:
    """Per-parameter Adam state. The ZeRO-1 / ZeRO-2 optimizers gather their shards chunk by chunk to the rank
    that writes them (dense: ``dp_rank`` 0, experts: ``edp_rank`` 0); other ranks get no entry (collective)."""
    if hasattr(optimizer, "state_by_param"):
        return optimizer.state_by_param()
    return {p: optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]}


def install_state_by_param(optimizer, state: dict) -> None:
    """Build a torch optimizer state_dict from per-parameter tensors and load it (torch places 'step')."""
    if hasattr(optimizer, "load_state_by_param"):  # ZeRO-1: keep this rank's shard
        optimizer.load_state_by_param(state)
        return
    sd = optimizer.state_dict()
    index = {}
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            index[p] = i
            i += 1
    new = {}
    for p, st in state.items():
        if p in index:
            new[index[p]] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                             "exp_avg": st["exp_avg"].to(p.device, p.dtype),
                             "exp_avg_sq": st["exp_avg_sq"].to(p.device, p.dtype)}
    sd["state"] = new
    optimizer.load_state_dict(sd)
