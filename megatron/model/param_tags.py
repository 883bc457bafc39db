"""Tags that parallelism, the optimizer and checkpointing read off parameters and modules, behind one API.

- expert: the parameter holds per-expert weights ([E_l, ...], one slice per local expert): reduced
  over the expert-data-parallel group, grouped apart by the optimizer, saved per expert;
- TP shard spec: the parameter is this rank's shard along ``dim`` of a full tensor, rank r holding
  the rows ``indices[r]``;
- output layer: a Linear whose weight is initialised with the smaller std / sqrt(2 L).

This module imports nothing from the project, so any layer of it may use the tags.
"""
from __future__ import annotations

import torch


def mark_expert(p: torch.Tensor) -> None:
    p.is_expert = True


def is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "is_expert", False))


def mark_tp_shard(p: torch.Tensor, dim: int, indices: list) -> None:
    p.tp_dim, p.tp_indices = dim, indices


def is_tp_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "tp_indices")


def mark_output_layer(module: torch.nn.Module) -> None:
    module.is_output_layer = True


def is_output_layer(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_output_layer", False))
