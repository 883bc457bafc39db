"""Process groups for tensor (TP), data (DP), expert (EP), expert-data (EDP) and pipeline (PP) parallelism.

Built once in ``initialize`` and passed explicitly; no module reads global process groups.
Rank layout (Megatron's): rank = p * (tp * dp) + d * tp + t, TP ranks consecutive, each pipeline stage p a
contiguous block. DP groups hold the ranks with the
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
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from megatron.errors import UserError

STARTUP_TIMEOUT = datetime.timedelta(minutes=5)
TRAINING_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class ExpertGroups:
    """The expert-parallel (EP) and expert-data-parallel (EDP) groups of one EP degree.

    PR-MoE layers with fewer experts ``e`` than ``--moe-expert-parallel-size`` run at EP = ``e``: the EP
    group splits into blocks of ``e`` consecutive DP indices, and the ranks of the group holding the same
    experts are extra expert-data-parallel replicas of that layer (EDP = DP / e, times the TP fold)."""

    ep_size: int
    ep_rank: int
    ep_group: Optional[Any]
    edp_size: int
    edp_rank: int
    edp_group: Optional[Any]


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
    sequence_parallel: bool = False  # --sequence-parallel at TP > 1: the residual stream split along the sequence
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: Optional[Any] = None  # the ranks with this rank's (TP, DP) coordinates, one per stage
    embedding_group: Optional[Any] = None  # first and last stage of pp_group (tied embeddings); None elsewhere
    world_group: Optional[Any] = None  # every rank, with the training timeout
    expert_layouts: dict = field(default_factory=dict)  # EP degree -> ExpertGroups (per-layer EP, PR-MoE)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def expert_groups(self, ep_size: Optional[int] = None) -> ExpertGroups:
        """The EP / EDP groups of EP degree ``ep_size`` (default: ``--moe-expert-parallel-size``)."""
        ep_size = ep_size or self.ep_size
        if ep_size == self.ep_size:
            return ExpertGroups(self.ep_size, self.ep_rank, self.ep_group, self.edp_size, self.edp_rank,
                                self.edp_group)
        if ep_size not in self.expert_layouts:
            raise ValueError(f"no expert-parallel groups of degree {ep_size} (built: {sorted(self.expert_layouts)}; "
                             f"pass the layers' degrees to build_groups)")
        return self.expert_layouts[ep_size]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.world_group)


def choose_device(use_cpu: bool, local_rank: int) -> torch.device:
    if not use_cpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _ep_coordinates(d: int, t: int, dp_size: int, tp_size: int, ep_size: int, fold: int) -> tuple[int, int, int]:
    """(ep_rank, edp_size, edp_rank) of DP index ``d``, TP rank ``t`` at EP degree ``ep_size``."""
    return d % ep_size, dp_size // ep_size * fold, d // ep_size * fold + (t if fold > 1 else 0)


def build_groups(rank: int, world_size: int, ep_size: int, device: torch.device, tp_size: int = 1,
                 tp_token_split: bool = True, pp_size: int = 1, layer_ep_sizes=(),
                 sequence_parallel: bool = False) -> ParallelState:
    """Create the TP, DP, EP, EDP and PP groups (every rank calls new_group for every group, in one order).

    Rank layout (Megatron-LM's tp-dp-pp order): rank = p * (TP * DP) + d * TP + t, so each pipeline
    stage p is a contiguous block of TP x DP ranks laid out as without pipelining, and the PP group of a
    rank holds the ranks with its (t, d) in every stage. ``layer_ep_sizes``: the EP degrees of layers that
    run below ``ep_size`` (PR-MoE layers with fewer experts); each gets its EP / EDP groups
    (:meth:`ParallelState.expert_groups`).
    ``tp_token_split`` False (``--disable-moe-tp-token-split``): every TP rank runs the MoE layer on all its
    tokens, so expert gradients are identical over TP and the EDP groups stay within one TP rank.
    ``sequence_parallel`` (TP > 1): each TP rank's MoE layers route their own sequence shard (no TP token split),
    and the EDP groups hold the TP ranks as with the split."""
    if world_size % (tp_size * pp_size):
        raise UserError(f"world size {world_size} is not divisible by --tensor-model-parallel-size × "
                        f"--pipeline-model-parallel-size ({tp_size} × {pp_size} = {tp_size * pp_size}): launch a "
                        f"multiple of {tp_size * pp_size} processes")
    dp_size = world_size // (tp_size * pp_size)
    stage_size = tp_size * dp_size
    p, within = rank // stage_size, rank % stage_size
    t, d = within % tp_size, within // tp_size
    sequence_parallel = sequence_parallel and tp_size > 1
    tp_token_split = tp_token_split and not sequence_parallel  # the shards are already different tokens
    fold = tp_size if tp_token_split or sequence_parallel else 1  # TP ranks in each EDP group
    ep_rank, edp_size, edp_rank = _ep_coordinates(d, t, dp_size, tp_size, ep_size, fold)
    ps = ParallelState(rank=rank, world_size=world_size, device=device, dp_size=dp_size, dp_rank=d,
                       ep_size=ep_size, ep_rank=ep_rank, edp_size=edp_size, edp_rank=edp_rank,
                       tp_size=tp_size, tp_rank=t, tp_token_split=tp_token_split and tp_size > 1,
                       sequence_parallel=sequence_parallel,
                       pp_size=pp_size, pp_rank=p)
    degrees = sorted({e for e in layer_ep_sizes if e != ep_size})
    for e in degrees:
        e_rank, e_edp_size, e_edp_rank = _ep_coordinates(d, t, dp_size, tp_size, e, fold)
        ps.expert_layouts[e] = ExpertGroups(e, e_rank, None, e_edp_size, e_edp_rank, None)
    if world_size == 1:
        return ps

    timeout = TRAINING_TIMEOUT if dist.is_initialized() else None

    def group(ranks):
        g = dist.new_group(ranks, timeout=timeout)
        return g if rank in ranks else None

    def assign(name, g, obj=None):
        if g is not None:
            setattr(obj or ps, name, g)

    def expert_group_ranks(base, e):
        """(EP groups, EDP groups) of degree ``e`` in the stage starting at rank ``base``."""
        eps = [[base + dd * tp_size + tt for dd in range(start, start + e)]
               for tt in range(tp_size) for start in range(0, dp_size, e)]
        edps = [[base + dd * tp_size + u for dd in range(j, dp_size, e) for u in range(tt, tt + fold)]
                for j in range(e) for tt in range(0, tp_size, fold)]
        return eps, edps

    for pp in range(pp_size):
        base = pp * stage_size
        for dd in range(dp_size):
            assign("tp_group", group([base + dd * tp_size + tt for tt in range(tp_size)]))
        for tt in range(tp_size):
            assign("dp_group", group([base + dd * tp_size + tt for dd in range(dp_size)]))
        eps, edps = expert_group_ranks(base, ep_size)
        for ranks in eps:
            assign("ep_group", group(ranks))
        for ranks in edps:
            assign("edp_group", group(ranks))
        for e in degrees:
            eps, edps = expert_group_ranks(base, e)
            groups = {"ep_group": None, "edp_group": None}
            for name, lists in (("ep_group", eps), ("edp_group", edps)):
                for ranks in lists:
                    g = group(ranks)
                    if g is not None:
                        groups[name] = g
            if pp == p:
                ps.expert_layouts[e] = replace(ps.expert_layouts[e], **groups)
    if pp_size > 1:
        for within_stage in range(stage_size):
            ranks = [pp * stage_size + within_stage for pp in range(pp_size)]
            assign("pp_group", group(ranks))
            assign("embedding_group", group([ranks[0], ranks[-1]]))
    ps.world_group = group(list(range(world_size)))
    return ps


def initialize(parallel_cfg, ep_size: int, before_groups: Optional[Callable[[], None]] = None,
               layer_ep_sizes=()) -> ParallelState:
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
                      getattr(parallel_cfg, "moe_tp_token_split", True),  # tools pass a namespace without it
                      getattr(parallel_cfg, "pipeline_model_parallel_size", 1), layer_ep_sizes,
                      getattr(parallel_cfg, "sequence_parallel", False))
    ps.local_rank = local_rank
    return ps


def destroy(ps: ParallelState) -> None:
    if ps.distributed and dist.is_initialized():
        dist.destroy_process_group()
