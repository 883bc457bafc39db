"""Tags that parallelism, the optimizer and checkpointing read off parameters and modules, behind one API.

- expert: the parameter holds per-expert weights ([E_l, ...], one slice per local expert): reduced
  over the expert-data-parallel group, grouped apart by the optimizer, saved per expert;
- TP shard spec: the parameter is this rank's shard along ``dim`` of a full tensor, rank r holding
  the rows ``indices[r]`` (and, where the sharding said which rank this is, ``tp_local_layout`` gives the
  full shape and this shard's indices: shard-local initialisation reads it);
- output layer: a Linear whose weight is initialised with the smaller std / sqrt(2 L);
- sequence-parallel replica: replicated over the TP ranks but computed on this rank's sequence shard
  (norms, row-parallel biases, the MoE layer's router / shared / residual parts under --sequence-parallel):
  its gradient is summed over the TP group;
- pipeline tied copy: the last pipeline stage's copy of the word embeddings (the tied output layer); its
  gradient is summed with the first stage's, and it is counted once, on the first stage, in the gradient norm.

This module imports nothing from the project, so any layer of it may use the tags.
"""
from __future__ import annotations

import torch


def mark_expert(p: torch.Tensor) -> None:
    p.is_expert = True


def is_expert(p: torch.Tensor) -> bool:
    return bool(getattr(p, "is_expert", False))


def mark_tp_shard(p: torch.Tensor, dim: int, indices: list, rank=None) -> None:
    p.tp_dim, p.tp_indices = dim, indices
    if rank is not None:
        p.tp_rank = rank


def is_tp_sharded(p: torch.Tensor) -> bool:
    return hasattr(p, "tp_indices")


def tp_local_layout(p: torch.Tensor):
    """(full shape, dim, this shard's indices along dim) of a TP shard marked with its rank, else None."""
    if not is_tp_sharded(p) or getattr(p, "tp_rank", None) is None:
        return None
    shape = list(p.shape)
    shape[p.tp_dim] = sum(len(i) for i in p.tp_indices)
    return tuple(shape), p.tp_dim, p.tp_indices[p.tp_rank]


def mark_output_layer(module: torch.nn.Module) -> None:
    module.is_output_layer = True


def is_output_layer(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "is_output_layer", False))


def mark_sequence_parallel(p: torch.Tensor) -> None:
    p.sequence_parallel = True


def is_sequence_parallel(p: torch.Tensor) -> bool:
    return bool(getattr(p, "sequence_parallel", False))


def mark_pipeline_tied_copy(p: torch.Tensor) -> None:
    p.pipeline_tied_copy = True


def is_pipeline_tied_copy(p: torch.Tensor) -> bool:
    return bool(getattr(p, "pipeline_tied_copy", False))
