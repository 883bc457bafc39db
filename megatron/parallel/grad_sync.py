"""Gradient reduction and the global gradient norm for dense + expert parameters.

Dense grads: all-reduce over DP, divided by DP. Expert grads: all-reduce over EDP (ranks holding
the same experts), divided by the full DP size (the all-to-all already summed the EP group's
contributions). The norm counts every parameter exactly once across all ranks (under pipeline
parallelism: summed over the stages, the last stage's tied copy of the word embeddings left out).

Under FSDP2 (``--use-torch-fsdp2``, ``parallel/fsdp.py``) parameters and gradients are DTensors sharded over
DP (dense) or EDP (experts): the norm sums the squares of the local shards over those groups first; clipping
and scaling act on the local shards.

Per-layer EP degrees (PR-MoE): an MoE layer with fewer experts ``e`` than ``--moe-expert-parallel-size`` runs at
EP degree ``e`` (``MoELayer.ep_size``); its expert gradients are reduced over that degree's EDP group and its
squares summed over that degree's EP group (:func:`expert_params_by_degree`), so every expert counts once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_expert, is_pipeline_tied_copy, is_sequence_parallel, is_tp_sharded

BUCKET_BYTES = 32 * 1024 * 1024
NORM_CHUNK = 4 * 1024 * 1024  # elements: the float64 temporaries of a squared norm, chunk by chunk (32 MiB)


def split_params(model: torch.nn.Module):
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert(p) else dense).append(p)
    return dense, expert


def expert_degrees(model: torch.nn.Module) -> dict:
    """{expert parameter: the EP degree of its MoE layer} (``MoELayer.ep_size``: ``min(EP, E)``)."""
    out = {}
    for m in model.modules():
        if isinstance(m, MoELayer):
            for p in m.parameters():
                if is_expert(p):
                    out[p] = m.ep_size
    return out


def expert_params_by_degree(model: torch.nn.Module, ps, expert=None) -> list:
    """[(ExpertGroups of degree e, the expert parameters of layers at degree e)], ascending e; ``expert``: the
    parameters to split (default: every trainable expert parameter). An expert parameter outside any MoE
    layer counts at ``ps.ep_size``. Every rank gets the same degrees (the model's structure), so collectives
    issued per entry match across ranks."""
    if expert is None:
        expert = split_params(model)[1]
    degree = expert_degrees(model)
    by: dict = {}
    for p in expert:
        by.setdefault(degree.get(p, ps.ep_size), []).append(p)
    return [(ps.expert_groups(e), by[e]) for e in sorted(by)]


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
    for g, params in expert_params_by_degree(model, ps, expert):  # each layer's EDP group at its EP degree
        if g.edp_size > 1:
            _allreduce_bucketed([p.grad for p in params], g.edp_group, 1.0 / ps.dp_size)
        elif ps.dp_size > 1:
            for p in params:
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


def sum_sequence_parallel_grads(model: torch.nn.Module, ps) -> None:
    """Under --sequence-parallel: the gradients of parameters replicated over TP but fed by one sequence shard
    (``param_tags.is_sequence_parallel``) summed over the TP group (one flat all-reduce); a no-op otherwise."""
    if not getattr(ps, "sequence_parallel", False):
        return
    params = [p for p in model.parameters() if is_sequence_parallel(p)]
    _ensure_grads(params)
    grads = [p.grad for p in params]
    if grads:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=ps.tp_group)
        for g, t in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(t)


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
    """sqrt(sum over dense params once + every expert once across its layer's EP group).

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
    expert_sq = torch.zeros((), dtype=torch.float64, device=dev)
    for g, params in (expert_params_by_degree(model, ps, expert) if ps.distributed else [(None, expert)]):
        whole_e = torch.zeros((), dtype=torch.float64, device=dev)
        shards_e = torch.zeros((), dtype=torch.float64, device=dev)
        for p in params:
            if p.grad is not None:
                if isinstance(p.grad, DTensor):
                    shards_e += sum_of_squares(p.grad.to_local())
                else:
                    whole_e += sum_of_squares(p.grad)
        if g is not None and g.edp_size > 1 and any(isinstance(p, DTensor) for p in params):
            dist.all_reduce(shards_e, group=g.edp_group)
        degree_sq = whole_e + shards_e
        if g is not None and g.ep_size > 1:  # the layers of this degree hold each expert on one rank of the group
            dist.all_reduce(degree_sq, group=g.ep_group)
        expert_sq += degree_sq
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
