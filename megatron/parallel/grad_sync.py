"""Gradient reduction and the global gradient norm for dense + expert parameters.

Dense grads: all-reduce over DP, divided by DP. Expert grads: all-reduce over EDP (ranks holding
the same experts), divided by the full DP size (the all-to-all already summed the EP group's
contributions). The norm counts every parameter exactly once across all ranks (under pipeline
parallelism: summed over the stages, the last stage's tied copy of the word embeddings left out).

Under FSDP2 (``--use-torch-fsdp2``, ``parallel/fsdp.py``) parameters and gradients are DTensors sharded over
DP (dense) or EDP (experts): the norm sums the squares of the local shards over those groups first; clipping
and scaling act on the local shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from megatron.model.param_tags import is_expert, is_pipeline_tied_copy, is_tp_sharded

BUCKET_BYTES = 32 * 1024 * 1024
NORM_CHUNK = 4 * 1024 * 1024  # elements: the float64 temporaries of a squared norm, chunk by chunk (32 MiB)


def split_params(model: torch.nn.Module):
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert(p) else dense).append(p)
    return dense, expert


def _ensure_grads(params):
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _allreduce_bucketed(grads, group, scale: float) -> None:
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= BUCKET_BYTES):
            if len(bucket) == 1 and bucket[0].is_contiguous():  # one large gradient: in place, no flat copy
                dist.all_reduce(bucket[0], group=group)
                bucket[0].mul_(scale)
                bucket, size = [], 0
                continue
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.mul_(scale)
            for t, s in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(s)
            bucket, size = [], 0


def allreduce_gradients(model: torch.nn.Module, ps) -> None:
    dense, expert = split_params(model)
    _ensure_grads(dense + expert)
    if not ps.distributed:
        return
    _allreduce_bucketed([p.grad for p in dense], ps.dp_group, 1.0 / ps.dp_size)
    if expert:
        if ps.edp_size > 1:
            _allreduce_bucketed([p.grad for p in expert], ps.edp_group, 1.0 / ps.dp_size)
        elif ps.dp_size > 1:
            for p in expert:
                p.grad.mul_(1.0 / ps.dp_size)


class GradReducer:
    """The gradient reduction of one step, in front of the blocking and the overlapped paths.

    ``arm()`` is called before the backward of the step's last micro-batch, ``finish()`` after it;
    afterwards every gradient is reduced (dense over DP, experts over EDP) and divided by DP.
    """

    def arm(self) -> None:
        pass

    def finish(self) -> None:
        raise NotImplementedError


class BlockingGradReducer(GradReducer):
    """Bucketed all-reduces after the last backward (the default)."""

    def __init__(self, model: torch.nn.Module, ps):
        self.model, self.ps = model, ps

    def finish(self) -> None:
        allreduce_gradients(self.model, self.ps)


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """sum(t ** 2) in float64 (a 0-d tensor), over chunks of :data:`NORM_CHUNK` elements: no float64 copy
    of a whole large gradient (a 50M-element embedding's would be 400 MB, and its square as much again)."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= NORM_CHUNK:
        return flat.double().square().sum()
    acc = torch.zeros((), dtype=torch.float64, device=t.device)
    for i in range(0, flat.numel(), NORM_CHUNK):
        acc += flat[i: i + NORM_CHUNK].double().square().sum()
    return acc


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def global_grad_norm(model: torch.nn.Module, ps) -> float:
    """sqrt(sum over dense params once + every expert once across the EP group).

    TP-sharded parameters are summed over the TP group; replicated ones (identical on every TP
    rank) are counted once. FSDP2's DTensor gradients hold a shard each: their squares are summed over
    the group they are sharded over (DP for dense, EDP for experts) before that.
    """
    dense, expert = split_params(model)
    dev = local_tensor(dense[0]).device if dense else torch.device("cpu")
    # dense: [TP-replicated, TP-sharded] of whole gradients, then the same of DTensor shards (summed over DP)
    whole = torch.zeros(2, dtype=torch.float64, device=dev)
    shards = torch.zeros(2, dtype=torch.float64, device=dev)
    for p in dense:
        if p.grad is not None and not is_pipeline_tied_copy(p):  # counted on the first stage
            acc = shards if isinstance(p.grad, DTensor) else whole
            acc[int(is_tp_sharded(p))] += sum_of_squares(local_tensor(p.grad))
    if ps.distributed and ps.dp_size > 1 and any(isinstance(p, DTensor) for p in dense):
        dist.all_reduce(shards, group=ps.dp_group)  # decided by the layout, not by which grads exist
    whole += shards
    dense_sq, sharded_sq = whole[0], whole[1].clone()
    if ps.tp_size > 1:
        dist.all_reduce(sharded_sq, group=ps.tp_group)
    dense_sq = dense_sq + sharded_sq
    expert_whole = torch.zeros((), dtype=torch.float64, device=dev)
    expert_shards = torch.zeros((), dtype=torch.float64, device=dev)
    for p in expert:
        if p.grad is not None:
            if isinstance(p.grad, DTensor):
                expert_shards += sum_of_squares(p.grad.to_local())
            else:
                expert_whole += sum_of_squares(p.grad)
    if ps.distributed and ps.edp_size > 1 and any(isinstance(p, DTensor) for p in expert):
        dist.all_reduce(expert_shards, group=ps.edp_group)
    expert_sq = expert_whole + expert_shards
    if ps.distributed and ps.ep_size > 1:
        dist.all_reduce(expert_sq, group=ps.ep_group)
    total_sq = dense_sq + expert_sq
    if ps.distributed and ps.pp_size > 1:
        dist.all_reduce(total_sq, group=ps.pp_group)  # every stage's layers
    return float(total_sq.sqrt())


def clip_gradients(model: torch.nn.Module, max_norm: float, total_norm: float) -> None:
    if max_norm > 0 and total_norm > max_norm:
        coef = max_norm / (total_norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                local_tensor(p.grad).mul_(coef)


def scale_gradients(model: torch.nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            local_tensor(p.grad).mul_(factor)
