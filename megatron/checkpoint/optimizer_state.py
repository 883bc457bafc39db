"""Adam state by parameter: how a checkpoint takes it from an optimizer and gives it back.

Checkpoints store optimizer state per parameter (``exp_avg``, ``exp_avg_sq``, ``step``), independent of
the optimizer's own index-based ``state_dict`` and of how ZeRO-1 shards it, so a checkpoint loads into
any data-parallel layout.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


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


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (FSDP2), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_adam_pieces(optimizer, create: bool = False) -> list:
    """(param, first flat element, exp_avg, exp_avg_sq) of each piece of Adam state this rank holds, in the
    coordinates of the parameter's local tensor (for a DTensor parameter: its local shard), as views that a
    sharded checkpoint writes from or loads into in place. The ZeRO optimizers give their shards' pieces; a
    torch optimizer gives each parameter's whole state, which ``create`` first allocates (zeros, step 0) where
    the optimizer has none yet (a load into a fresh optimizer)."""
    if hasattr(optimizer, "local_state_pieces"):
        return list(optimizer.local_state_pieces())
    out = []
    for g in optimizer.param_groups:
        for p in g["params"]:
            st = optimizer.state.get(p)
            if (not st or "exp_avg" not in st) and create:
                st = optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                           "exp_avg_sq": torch.zeros_like(p)}
            if st and "exp_avg" in st:
                out.append((p, 0, _local(st["exp_avg"]).reshape(-1), _local(st["exp_avg_sq"]).reshape(-1)))
    return out


def adam_steps(optimizer) -> dict:
    """The Adam step count of every parameter that has state (by parameter)."""
    if hasattr(optimizer, "steps_by_param"):
        return optimizer.steps_by_param()
    return {p: float(st["step"]) for g in optimizer.param_groups for p in g["params"]
            if (st := optimizer.state.get(p)) and "step" in st}


def set_adam_steps(optimizer, steps: dict) -> None:
    """Give each parameter's Adam state the step count in ``steps`` (by parameter)."""
    if hasattr(optimizer, "set_steps"):
        optimizer.set_steps(steps)
        return
    for p, step in steps.items():
        st = optimizer.state.get(p)
        if st and "step" in st:
            st["step"].fill_(float(step)) if torch.is_tensor(st["step"]) else st.__setitem__("step", float(step))
