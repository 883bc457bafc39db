"""Process groups for tensor (TP), data (DP), expert (EP) and expert-data (EDP) parallelism.

Built once in ``initialize`` and passed explicitly; no module reads global process groups.
Rank layout (Megatron's): rank = d * tp + t, TP ranks consecutive. DP groups hold the ranks with the
same TP rank t; EP groups are consecutive blocks of ``ep`` DP indices d (same t), so the all-to-all
runs only among ranks of the same TP rank (the paper's parallelism-coordinated communication).
EDP groups hold the ranks with the same EP rank, over every TP rank: the MoE layer splits its routed
tokens over the TP ranks (``parallel/token_split.py``), so each TP rank's expert gradients cover a
different share of the tokens and are summed with the other replicas' (size DP / EP x TP; with
``--disable-moe-tp-token-split``, the ranks with the same TP rank only, size DP / EP).

Timeouts: the default group, used only during start-up (the settings check, preflight), gives up
after ``STARTUP_TIMEOUT`` so that a rank that never arrives ends the job in minutes; the groups of
the training collectives (TP, DP, EP, EDP and ``world_group``) wait ``TRAINING_TIMEOUT``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

STARTUP_TIMEOUT = datetime.timedelta(minutes=5)
TRAINING_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: Optional[Any] = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Optional[Any] = None
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: Optional[Any] = None
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: Optional[Any] = None
    tp_token_split: bool = False  # MoE layers split their routed tokens over the TP ranks (token_split.py)
    world_group: Optional[Any] = None  # every rank, with the training timeout

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.world_group)


def choose_device(use_cpu: bool, local_rank: int) -> torch.device:
    if not use_cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_groups(rank: int, world_size: int, ep_size: int, device: torch.device, tp_size: int = 1,
                 tp_token_split: bool = True) -> ParallelState:
    """Create the TP, DP, EP and EDP groups (every rank calls new_group for every group, in one order).
    ``tp_token_split`` False (``--disable-moe-tp-token-split``): every TP rank runs the MoE layer on all its
    tokens, so expert gradients are identical over TP and the EDP groups stay within one TP rank."""
    dp_size = world_size // tp_size
    t, d = rank % tp_size, rank // tp_size
    fold = tp_size if tp_token_split else 1  # TP ranks in each EDP group
    ps = ParallelState(rank=rank, world_size=world_size, device=device, dp_size=dp_size, dp_rank=d,
                       ep_size=ep_size, ep_rank=d % ep_size, edp_size=dp_size // ep_size * fold,
                       edp_rank=d // ep_size * fold + (t if fold > 1 else 0),
                       tp_size=tp_size, tp_rank=t, tp_token_split=tp_token_split and tp_size > 1)
    if world_size == 1:
        return ps

    timeout = TRAINING_TIMEOUT if dist.is_initialized() else None

    def group(ranks):
        g = dist.new_group(ranks, timeout=timeout)
        return g if rank in ranks else None

    def assign(name, g):
        if g is not None:
            setattr(ps, name, g)

    for dd in range(dp_size):
        assign("tp_group", group([dd * tp_size + tt for tt in range(tp_size)]))
    for tt in range(tp_size):
        assign("dp_group", group([dd * tp_size + tt for dd in range(dp_size)]))
        for start in range(0, dp_size, ep_size):
            assign("ep_group", group([dd * tp_size + tt for dd in range(start, start + ep_size)]))
    for j in range(ep_size):
        for tt in range(0, tp_size, fold):
            assign("edp_group", group([dd * tp_size + u for dd in range(j, dp_size, ep_size) for u in range(tt, tt + fold)]))
    ps.world_group = group(list(range(world_size)))
    return ps


def initialize(parallel_cfg, ep_size: int, before_groups: Optional[Callable[[], None]] = None) -> ParallelState:
    """Start torch.distributed from torchrun's environment (or run as one process).

    ``before_groups()`` runs once the default group is up and before any other group is created
    (the ranks' settings check: a rank with another EP or TP size would otherwise hang in new_group).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(parallel_cfg.use_cpu, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = parallel_cfg.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=STARTUP_TIMEOUT, **kwargs)
    if before_groups is not None:
        before_groups()
    ps = build_groups(rank, world_size, ep_size, device, parallel_cfg.tensor_model_parallel_size,
                      getattr(parallel_cfg, "moe_tp_token_split", True))  # tools pass a namespace without it
    ps.local_rank = local_rank
    return ps


def destroy(ps: ParallelState) -> None:
    if ps.distributed and dist.is_initialized():
        dist.destroy_process_group()
