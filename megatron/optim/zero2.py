"""ZeRO stage 2 (``--zero-stage 2``, DeepSpeed's ``zero_optimization.stage: 2``): sharded Adam state
AND sharded gradients.

Built on the ZeRO-1 optimizer's layout (each domain's parameters end to end, cut into equal
contiguous shards over its group: dense over DP, experts over expert-DP). Instead of all-reducing
every gradient, the flat gradient of a domain is reduce-scattered, so each rank receives only the
averaged gradient of its own shard; the full per-parameter gradients are then freed. The gradient
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
from megatron.optim.distributed_optimizer import DistributedAdamW, _Domain


def _reduce_scatter_shard(domain: _Domain, scale: float) -> torch.Tensor:
    """This rank's shard of the domain's averaged flat gradient: [hi - lo] (fp32)."""
    dev = domain.exp_avg.device
    if domain.shard == 0:  # no parameters in this domain (a dense model's experts)
        return torch.zeros(0, dtype=torch.float32, device=dev)
    flat = torch.zeros(domain.shard * domain.size, dtype=torch.float32, device=dev)
    for p, off, n in zip(domain.params, domain.offsets, domain.numels):
        if p.grad is not None:
            flat[off: off + n] = p.grad.detach().reshape(-1).float()
    if domain.size > 1:
        out = torch.empty(domain.shard, dtype=torch.float32, device=dev)
        dist.reduce_scatter_single(out, flat, group=domain.group)
    else:
        out = flat
    out.mul_(scale)
    return out[: domain.exp_avg.numel()]  # the last rank's shard may be shorter (padding at the end)


class ShardedGradients(DistributedAdamW):
    """AdamW with Adam state and gradients sharded over each domain's data-parallel group."""

    shards_gradients = True  # the trainer calls reduce_gradients / scale_gradients / grad_norm / clip_gradients

    def __init__(self, model: torch.nn.Module, opt_cfg, ps):
        super().__init__(model, opt_cfg, ps)
        self.ps = ps
        self.grad_shards = [None, None]  # per domain, after reduce_gradients()
        # per domain: which shard elements belong to TP-sharded parameters (counted over the TP group)
        self._tp_mask = []
        for d in self.domains:
            mask = torch.zeros(d.exp_avg.numel(), dtype=torch.bool, device=d.exp_avg.device)
            for p, a, b, s in d.pieces:
                mask[s: s + b - a] = is_tp_sharded(p)
            self._tp_mask.append(mask)

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
        for d, g, mask in zip(self.domains, self.grad_shards, self._tp_mask):
            g64 = g.double().square()
            part = torch.stack([g64[~mask].sum() if g64.numel() else g64.new_zeros(()),
                                g64[mask].sum() if g64.numel() else g64.new_zeros(())]).to(dev)
            if d.size > 1:
                dist.all_reduce(part, group=d.group)
            sq.append(part)
        dense, expert = sq
        if ps.tp_size > 1:
            tp_part = torch.stack([dense[1], expert[1]])
            dist.all_reduce(tp_part, group=ps.tp_group)
            dense, expert = torch.stack([dense[0], tp_part[0]]), torch.stack([expert[0], tp_part[1]])
        expert_sq = expert.sum()
        if ps.distributed and ps.ep_size > 1:
            dist.all_reduce(expert_sq, group=ps.ep_group)
        return float((dense.sum() + expert_sq).sqrt())

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
        self.grad_shards = [None, None]
