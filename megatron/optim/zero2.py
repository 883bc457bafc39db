"""ZeRO stage 2 (``--zero-stage 2``, DeepSpeed's ``zero_optimization.stage: 2``): sharded Adam state
AND sharded gradients.

Built on the ZeRO-1 optimizer's layout (each domain's parameters end to end, cut into equal
contiguous shards over its group: dense over DP, experts over expert-DP, one domain per EP degree). Instead of all-reducing
every gradient, the flat gradient of a domain is reduce-scattered chunk by chunk (one bucket of
transient; NCCL's reduce-scatter, or on gloo an all-reduce of the bucket, faster there than its
reduce-scatter), so each rank receives only the averaged gradient of its own shard, and each full
per-parameter gradient is freed as soon as the chunks that read it are done. The gradient
norm is a sum of shard norms over the group, clipping scales the shards, and the Adam update
reads the shard — element for element torch.optim.AdamW on the all-reduced gradients. Checkpoints
hold full per-parameter Adam state (as ZeRO-1's), so they load at any DP size or optimizer kind.

It says so with ``shards_gradients = True`` (:func:`megatron.optim.build.shards_gradients`); the
training step then drives it through :class:`ShardedGradients`' four calls, in this order::

    opt.reduce_gradients()        # instead of the all-reduce; frees p.grad
    opt.scale_gradients(1 / loss_scale)
    norm = opt.grad_norm()        # instead of global_grad_norm(model, ps)
    opt.clip_gradients(clip, norm); opt.step()
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.model.param_tags import is_tp_sharded
from megatron.optim.distributed_optimizer import (
    DistributedAdamW,
    _Domain,
    native_tensor_collectives,
    reduce_scatter_flat,
)
from megatron.parallel.grad_sync import sum_of_squares


def _reduce_scatter_shard(domain: _Domain, scale: float) -> torch.Tensor:
    """This rank's shard of the domain's averaged flat gradient: [hi - lo] (fp32), freeing p.grad on the way.

    Chunk k of the reduce-scatter takes elements [k, k + chunk) of every rank's shard: a bucket of
    ``size * chunk`` elements filled from the gradients, then NCCL's reduce-scatter or, on gloo,
    an all-reduce of the bucket of which this rank keeps its part. A gradient is freed as soon as every
    chunk that reads it is done, so full gradients, one bucket and the shard are all that coexist.
    """
    dev = domain.exp_avg.device
    if domain.shard == 0:  # no parameters in this domain (a dense model's experts)
        return torch.zeros(0, dtype=torch.float32, device=dev)
    out = torch.empty(domain.shard, dtype=torch.float32, device=dev)
    native = domain.size > 1 and native_tensor_collectives(domain.group)
    chunks = domain.chunks()
    bucket = torch.empty(domain.size * (chunks[0][1] - chunks[0][0]), dtype=torch.float32, device=dev)
    order = sorted(range(len(domain.params)), key=lambda i: domain.reach[i])
    freed = 0
    for k0, k1 in chunks:
        c = k1 - k0
        flat = bucket[: domain.size * c]
        flat.zero_()
        for j in range(domain.size):
            start = j * domain.shard + k0
            for i, a, b, s in domain.params_in(start, min(start + c, domain.total)):
                g = domain.params[i].grad
                if g is not None:
                    flat[j * c + s: j * c + s + b - a] = g.detach().reshape(-1)[a:b]
        mine = out[k0: k1]
        if domain.size == 1:
            mine.copy_(flat)
        elif native:
            reduce_scatter_flat(mine, flat, group=domain.group)
        else:
            dist.all_reduce(flat, group=domain.group)
            mine.copy_(flat[domain.rank * c: (domain.rank + 1) * c])
        while freed < len(order) and domain.reach[order[freed]] < k1:
            domain.params[order[freed]].grad = None
            freed += 1
    out.mul_(scale)
    return out[: domain.exp_avg.numel()]  # the last rank's shard may be shorter (padding at the end)


class ShardedGradients(DistributedAdamW):
    """AdamW with Adam state and gradients sharded over each domain's data-parallel group."""

    shards_gradients = True  # the trainer calls reduce_gradients / scale_gradients / grad_norm / clip_gradients

    def __init__(self, model: torch.nn.Module, opt_cfg, ps):
        super().__init__(model, opt_cfg, ps)
        self.ps = ps
        self.grad_shards = [None] * len(self.domains)  # per domain, after reduce_gradients()

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter each domain's gradients (dense / DP, experts / full DP size) and free p.grad."""
        dp = self.ps.dp_size
        for i, d in enumerate(self.domains):
            self.grad_shards[i] = _reduce_scatter_shard(d, 1.0 / dp)
            for p in d.params:
                p.grad = None

    @torch.no_grad()
    def scale_gradients(self, factor: float) -> None:
        for g in self.grad_shards:
            g.mul_(factor)

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The global gradient norm, every parameter counted once (as global_grad_norm)."""
        ps = self.ps
        dev = self.domains[0].exp_avg.device
        sq = []
        for d, g in zip(self.domains, self.grad_shards):
            part = torch.zeros(2, dtype=torch.float64, device=dev)  # [replicated over TP, TP-sharded]
            for p, a, b, s in d.pieces:  # piece by piece, in chunks: no float64 copy of the shard
                part[int(is_tp_sharded(p))] += sum_of_squares(g[s: s + b - a])
            if d.size > 1:
                dist.all_reduce(part, group=d.group)
            sq.append(part)
        if ps.tp_size > 1:  # TP-sharded squares of every domain, summed over TP in one call
            tp_part = torch.stack([part[1] for part in sq])
            dist.all_reduce(tp_part, group=ps.tp_group)
            sq = [torch.stack([part[0], t]) for part, t in zip(sq, tp_part)]
        total = sq[0].sum()
        for d, part in zip(self.domains[1:], sq[1:]):  # experts: each degree's over its EP group
            expert_sq = part.sum()
            if ps.distributed and d.experts.ep_size > 1:
                dist.all_reduce(expert_sq, group=d.experts.ep_group)
            total = total + expert_sq
        return float(total.sqrt())

    @torch.no_grad()
    def clip_gradients(self, max_norm: float, total_norm: float) -> None:
        if max_norm > 0 and total_norm > max_norm:
            coef = max_norm / (total_norm + 1e-6)
            for g in self.grad_shards:
                g.mul_(coef)

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for d, g in zip(self.domains, self.grad_shards):
            d.update(lr, self.betas[0], self.betas[1], self.eps, grad_shard=g)
        self.grad_shards = [None] * len(self.domains)
