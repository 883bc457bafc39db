"""Ranks that agree: the same settings at start-up, one verdict for per-rank checks, identical replicas.

* ``agree_on_settings``: every rank all-gathers a hash of its flattened config right after the
  default process group is up, before any other group or collective; on a mismatch every rank
  raises the same one-line error naming the differing option and the ranks.
* ``agree_on_error``: a check that runs on some ranks only (rank 0 proving the save directory
  writable) becomes an error on every rank instead of a hang in the next collective.
* ``check_replicas``: before a save, every replica of a weight must be identical (dense weights over
  DP, TP-replicated ones over TP, experts over their expert-data-parallel group); a cheap checksum
  (sum and sum of squares, float64) is all-gathered over each group.
"""
from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron.config.options import iter_options
from megatron.config.schema import Config
from megatron.errors import TrainingFault, UserError
from megatron.model.param_tags import is_expert, is_tp_sharded
from megatron.parallel.collectives import agree_on_error, any_rank  # noqa: F401 (agree_on_error: re-exported)
from megatron.parallel.grad_sync import expert_params_by_degree


def flatten_settings(d: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 1}} -> {"train.seed": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_settings(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_hash(flat: dict) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _flag_of(key: str) -> str:
    """The flag of a config field ("train.global_batch_size" -> "--global-batch-size (train.global_batch_size)")."""
    flags = {path: f.metadata["flag"] for path, _, f in iter_options(Config)}
    return f"{flags[key]} ({key})" if key in flags else key


def describe_mismatch(per_rank: list[dict]) -> str | None:
    """One line naming the first differing option and each rank's value, or None if all agree."""
    keys = sorted(set().union(*per_rank))
    for k in keys:
        values = [json.dumps(r.get(k), default=str) for r in per_rank]
        if len(set(values)) > 1:
            groups: dict = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            parts = "; ".join(f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {v}" for v, r in groups.items())
            return (f"the ranks were launched with different settings: {_flag_of(k)} differs ({parts}); "
                    f"launch every rank with the same flags")
    return None


def agree_on_settings(settings: dict, world_size: int) -> None:
    """Raise the same UserError on every rank unless all ranks hold the same settings (default group)."""
    if world_size <= 1 or not dist.is_initialized():
        return
    flat = flatten_settings(settings)
    hashes = [None] * world_size
    dist.all_gather_object(hashes, settings_hash(flat))
    if len(set(hashes)) == 1:
        return
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, flat)
    raise UserError(describe_mismatch(per_rank) or "the ranks were launched with different settings")


CHECKSUM_CHUNK = 1 << 20  # elements: the float64 transient of the replica check (8 MiB, and its square)


def _checksum(params) -> torch.Tensor:
    """[2] float64: sum and sum of squares of ``params``."""
    acc = torch.zeros(2, dtype=torch.float64)
    for p in params:
        flat = (p.to_local() if isinstance(p, DTensor) else p).detach().reshape(-1)
        for i in range(0, flat.numel(), CHECKSUM_CHUNK):  # float64 copies of one chunk at a time, not the tensor
            t = flat[i: i + CHECKSUM_CHUNK].double()
            acc[0] += t.sum().cpu()
            acc[1] += t.square().sum().cpu()
    return acc


def _replica_groups(model, ps) -> list:
    """(what, group, size, params): each set of parameters that must be identical over a group. FSDP2's sharded
    parameters (DTensors) are shards over DP / EDP, not replicas: only their TP replicas are compared."""
    params = list(model.parameters())
    whole = [p for p in params if not isinstance(p, DTensor)]
    groups = [("dense weights of data-parallel replicas", ps.dp_group, ps.dp_size,
               [p for p in whole if not is_expert(p)])]
    if ps.tp_size > 1:  # layer norms, routers, MoE layers ... replicated over TP (shards differ by design)
        groups.append(("TP-replicated weights of tensor-parallel ranks", ps.tp_group, ps.tp_size,
                       [p for p in params if not is_expert(p) and not is_tp_sharded(p)]))
    expert = [p for p in whole if is_expert(p)]
    for g, params in expert_params_by_degree(model, ps, expert) if ps.distributed else []:
        if g.edp_size > 1:  # the replicas of this rank's experts (over DP and, with the MoE token split, TP) at
            # their layer's EP degree (PR-MoE layers with fewer experts than EP have more replicas)
            degree = f" (EP degree {g.ep_size} layers)" if g.ep_size != ps.ep_size else ""
            what = f"expert weights of their replicas{degree}"
            groups.append((what, g.edp_group, g.edp_size, params))
    return groups


def check_replicas(model, ps, iteration: int) -> None:
    """Every replica of every weight is identical (dense over DP, TP-replicated over TP, experts over their
    expert-data-parallel group), or one error on every rank."""
    for what, group, size, params in _replica_groups(model, ps):
        if size <= 1:
            continue
        local = _checksum(params).to(ps.device)
        gathered = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(gathered, local, group=group)
        sums = [g.cpu() for g in gathered]
        bad = [r for r, s in enumerate(sums) if not torch.equal(s, sums[0])]
        if any_rank(bool(bad), ps):
            raise TrainingFault(
                f"iteration {iteration}: the {what} differ (checksums "
                f"{[round(float(s[0]), 6) for s in sums]}); the replicas diverged, so no checkpoint was written "
                f"and the last one is kept: check that every rank runs the same code, flags and hardware")