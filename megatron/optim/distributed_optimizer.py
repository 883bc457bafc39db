"""ZeRO stage 1 (``--use-distributed-optimizer``): AdamW whose state is sharded over data-parallel ranks.

The layout is Megatron's distributed optimizer: the parameters of each domain (dense: over the DP
group; experts: over the expert-DP group, the ranks holding the same experts, one domain per EP degree
of the MoE layers: PR-MoE layers with fewer experts than EP run at a lower degree) live end to end in
one contiguous **parameter buffer** (padded to a multiple of the group size), each parameter's
``.data`` a view into it. The buffer is cut into equal contiguous shards, one per rank; each rank
keeps Adam moments (fp32) only for its shard and updates the shard's elements in place, through
views, piece by piece (at most :data:`CHUNK` elements of temporaries). The updated shards are then
all-gathered straight into the buffer: ``all_gather_into_tensor`` in one in-place call where the
backend is NCCL; elsewhere (gloo) ``all_gather`` chunk by chunk into views of the buffer. No step
builds a tensor of the whole flat model. The update is torch.optim.AdamW's, element for element.

Checkpoints: the sharded format writes each rank's shard as it is (:meth:`DistributedAdamW.local_state_pieces`:
views of the Adam moments by parameter and flat range, no communication) and loads into it in place, at
any layout. The full-tensor format (``--ckpt-format torch``) instead takes :meth:`DistributedAdamW.state_by_param`,
which gathers the shards chunk by chunk to the group's first rank (the rank that writes them). Either
way a checkpoint written with the sharded optimizer loads into a plain one at any DP size, and back.
"""
from __future__ import annotations

import bisect
import math

import torch
import torch.distributed as dist

from megatron.model.param_tags import is_expert
from megatron.optim.param_groups import param_groups
from megatron.parallel.grad_sync import expert_degrees

CHUNK = 4 * 1024 * 1024  # elements: the largest transient of an update, an all-gather or a gather (16 MiB fp32)


def native_tensor_collectives(group) -> bool:
    """Whether the group's backend runs the flat collectives in place on views of one buffer
    (``all_gather_single`` / ``reduce_scatter_single``, formerly ``*_into_tensor`` / ``*_tensor``): NCCL.
    gloo takes the chunked list forms (its flat collectives copy, and its reduce-scatter is slower than an
    all-reduce)."""
    return dist.is_initialized() and dist.get_backend(group) == "nccl"


# torch >= 2.13 names the flat collectives *_single (the *_tensor names are deprecated aliases)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Domain:
    """Parameters sharing one process group (dense / experts): their contiguous buffer and this rank's shard."""

    def __init__(self, params_wd: list, group, size: int, rank: int, chunk: int | None = None, experts=None):
        self.params = [p for p, _ in params_wd]
        self.experts = experts  # experts: ExpertGroups of the domain's EP degree (norms sum over its EP group)
        self.group, self.size, self.rank, self.chunk = group, size, rank, chunk or CHUNK
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.total = total
        self.shard = math.ceil(total / size) if total else 0
        self.lo, self.hi = min(rank * self.shard, total), min((rank + 1) * self.shard, total)
        wd_of = {id(p): wd for p, wd in params_wd}
        self.pieces = []  # (param, first element, last element + 1, position in the shard)
        self.piece_wd = []
        for p, off, n in zip(self.params, self.offsets, self.numels):
            a, b = max(off, self.lo), min(off + n, self.hi)
            if a < b:
                self.pieces.append((p, a - off, b - off, a - self.lo))
                self.piece_wd.append(wd_of[id(p)])
        dev = self.params[0].device if self.params else torch.device("cpu")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"the distributed optimizer needs one parameter dtype per domain, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop() if dtypes else torch.float32
        # the parameter buffer: every parameter's .data becomes a view into it (padding at the end)
        self.buffer = torch.zeros(self.shard * size, dtype=dtype, device=dev)
        with torch.no_grad():
            for p, off, n in zip(self.params, self.offsets, self.numels):
                view = self.buffer[off: off + n].view_as(p)
                view.copy_(p.data)
                p.data = view
        self.local = self.buffer[rank * self.shard: (rank + 1) * self.shard]  # this rank's shard (padded), a view
        self.exp_avg = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=dev)
        self.exp_avg_sq = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=dev)
        # ZeRO-2: how far into a shard each parameter reaches (its gradient is freed once the
        # chunked reduce-scatter has passed that position in every rank's shard)
        self.reach = []
        for off, n in zip(self.offsets, self.numels):
            if n == 0:
                self.reach.append(-1)
            elif off // self.shard != (off + n - 1) // self.shard:
                self.reach.append(self.shard - 1)
            else:
                self.reach.append((off + n - 1) % self.shard)
        self.step = 0

    def params_in(self, start: int, end: int):
        """(index, first element, last element + 1, position from ``start``) of each parameter overlapping
        the flat range [start, end)."""
        i = max(bisect.bisect_right(self.offsets, start) - 1, 0)
        while i < len(self.params) and self.offsets[i] < end:
            off, n = self.offsets[i], self.numels[i]
            a, b = max(off, start), min(off + n, end)
            if a < b:
                yield i, a - off, b - off, a - start
            i += 1

    def chunks(self):
        """(start, end) ranges of at most ``chunk`` elements covering one shard."""
        return [(k, min(k + self.chunk, self.shard)) for k in range(0, self.shard, self.chunk)]

    def update(self, lr: float, beta1: float, beta2: float, eps: float, grad_shard=None) -> None:
        """One AdamW step of this rank's shard, in place in the parameter buffer, then the all-gather;
        ``grad_shard`` (ZeRO-2) replaces the shard of p.grad."""
        self.step += 1
        bc1, bc2 = 1.0 - beta1 ** self.step, 1.0 - beta2 ** self.step
        sqrt_bc2 = math.sqrt(bc2)
        for (p, a, b, s), wd in zip(self.pieces, self.piece_wd):
            grad = p.grad.reshape(-1) if grad_shard is None else None
            for c0 in range(0, b - a, self.chunk):
                c1 = min(c0 + self.chunk, b - a)
                x = self.buffer[self.lo + s + c0: self.lo + s + c1]
                g = (grad[a + c0: a + c1] if grad is not None else grad_shard[s + c0: s + c1]).float()
                m, v = self.exp_avg[s + c0: s + c1], self.exp_avg_sq[s + c0: s + c1]
                xf = x if x.dtype == torch.float32 else x.float()
                xf.mul_(1.0 - lr * wd)
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = (v.sqrt() / sqrt_bc2).add_(eps)
                xf.addcdiv_(m, denom, value=-lr / bc1)
                if xf is not x:
                    x.copy_(xf)
        self.all_gather_params()

    def all_gather_params(self) -> None:
        """Every rank's updated shard into every replica's parameter buffer, in place."""
        if self.size == 1 or self.shard == 0:
            return
        if native_tensor_collectives(self.group):
            _all_gather_flat(self.buffer, self.local, group=self.group)
            return
        for k0, k1 in self.chunks():  # gloo: list form, chunk by chunk, into views of the buffer
            views = [self.buffer[j * self.shard + k0: j * self.shard + k1] for j in range(self.size)]
            dist.all_gather(views, views[self.rank], group=self.group)

    def full_state(self) -> dict:
        """Per-parameter full Adam state on the group's first rank (the checkpoint writer), gathered chunk by
        chunk (transient: one chunk per rank); the other ranks send their shard and get {}. Collective."""
        writer = self.rank == 0
        out = {}
        if writer:
            for p in self.params:
                out[p] = {"exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=self.exp_avg.device),
                          "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=self.exp_avg.device),
                          "step": float(self.step)}
        if self.shard == 0:
            return out
        if self.size == 1:
            for key, src in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                for i, a, b, s in self.params_in(0, self.total):
                    out[self.params[i]][key].view(-1)[a:b] = src[s: s + b - a]
            return out
        dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for k0, k1 in self.chunks():
            c = k1 - k0
            for key, src in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                send = src.new_zeros(c)
                mine = src[k0: k1]
                send[: mine.numel()] = mine
                parts = [torch.empty_like(send) for _ in range(self.size)] if writer else None
                dist.gather(send, parts, dst=dst, group=self.group)
                if writer:
                    for j, part in enumerate(parts):
                        start = j * self.shard + k0
                        for i, a, b, s in self.params_in(start, min(start + c, self.total)):
                            out[self.params[i]][key].view(-1)[a:b] = part[s: s + b - a]
        return out

    def load_full_state(self, state: dict) -> None:
        for p, a, b, s in self.pieces:
            st = state.get(p)
            if st is None:
                continue
            self.exp_avg[s: s + b - a] = st["exp_avg"].reshape(-1)[a:b].to(self.exp_avg)
            self.exp_avg_sq[s: s + b - a] = st["exp_avg_sq"].reshape(-1)[a:b].to(self.exp_avg)
        steps = [float(st["step"]) for st in state.values()]
        if steps:
            self.step = int(max(steps))


class DistributedAdamW:
    """The optimizer interface the training loop uses: ``param_groups`` (lr), ``step()``, and state I/O.

    ``shards_gradients`` is False: every rank keeps full gradients (all-reduced by the grad reducer), so the
    trainer unscales, measures and clips them on the model as for torch AdamW.

    Building it moves every parameter's ``.data`` into its domain's contiguous buffer (values unchanged).
    """

    shards_gradients = False

    def __init__(self, model: torch.nn.Module, opt_cfg, ps):
        self.param_groups = param_groups(model, opt_cfg.weight_decay)
        for g in self.param_groups:
            g["lr"] = opt_cfg.lr
        self.betas, self.eps = (opt_cfg.adam_beta1, opt_cfg.adam_beta2), opt_cfg.adam_eps
        dense = [(p, g["weight_decay"]) for g in self.param_groups for p in g["params"] if not is_expert(p)]
        degree = expert_degrees(model)
        by_degree: dict = {ps.ep_size: []}  # the default degree's domain exists even without experts
        for g in self.param_groups:
            for p in g["params"]:
                if is_expert(p):
                    by_degree.setdefault(degree.get(p, ps.ep_size), []).append((p, g["weight_decay"]))
        self.domains = [_Domain(dense, ps.dp_group, ps.dp_size, ps.dp_rank)]
        for e in sorted(by_degree, reverse=True):  # the default (largest) degree first, then PR-MoE's lower ones
            if by_degree[e] or e == ps.ep_size:
                eg = ps.expert_groups(e)
                self.domains.append(_Domain(by_degree[e], eg.edp_group, eg.edp_size, eg.edp_rank, experts=eg))

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for d in self.domains:
            d.update(lr, self.betas[0], self.betas[1], self.eps)

    @torch.no_grad()
    def state_by_param(self) -> dict:
        """Full per-parameter Adam state of each domain on the domain group's first rank (dense: ``dp_rank``
        0, experts: ``edp_rank`` 0 — the ranks that write them into a checkpoint); other ranks get no entry
        for that domain. Collective over each domain's group; gathered chunk by chunk."""
        out = {}
        for d in self.domains:
            out.update(d.full_state())
        return out

    def load_state_by_param(self, state: dict) -> None:
        for d in self.domains:
            d.load_full_state(state)

    def local_state_pieces(self):
        """(param, first flat element, exp_avg, exp_avg_sq) of each piece of a parameter this rank's shards hold:
        the Adam moments of elements [first, first + len) of the flattened parameter, as views into the shards
        (a sharded checkpoint writes them as they are, and loads into them in place). No communication."""
        for d in self.domains:
            for p, a, b, s in d.pieces:
                yield p, a, d.exp_avg[s: s + b - a], d.exp_avg_sq[s: s + b - a]

    def steps_by_param(self) -> dict:
        """The Adam step count of every parameter (its domain's)."""
        return {p: d.step for d in self.domains for p in d.params}

    def set_steps(self, steps: dict) -> None:
        """Set each domain's step count from ``steps`` (by parameter; the largest of a domain's entries)."""
        for d in self.domains:
            known = [int(steps[p]) for p in d.params if p in steps]
            if known:
                d.step = max(known)
