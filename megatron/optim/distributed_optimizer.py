"""ZeRO stage 1 (``--use-distributed-optimizer``): AdamW whose state is sharded over data-parallel ranks.

The parameters of each domain (dense: over the DP group; experts: over the expert-DP group, the
ranks holding the same experts) are laid end to end in a fixed order and cut into equal
contiguous shards. Each rank keeps Adam moments (fp32) only for its shard, updates only those
elements after the gradient all-reduce, and the updated shards are all-gathered back into every
replica's parameters. The update is torch.optim.AdamW's, element for element.

Checkpoints see per-parameter full tensors (``state_by_param`` all-gathers them), so a checkpoint
written with the sharded optimizer loads into a plain one at any DP size, and the other way round.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron.model.param_tags import is_expert
from megatron.optim.param_groups import param_groups


class _Domain:
    """Parameters sharing one process group (dense / experts) and this rank's shard of them."""

    def __init__(self, params_wd: list, group, size: int, rank: int):
        self.params = [p for p, _ in params_wd]
        self.group, self.size, self.rank = group, size, rank
        self.numels = [p.numel() for p in self.params]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        total = self.offsets[-1]
        self.shard = math.ceil(total / size) if total else 0
        lo, hi = min(rank * self.shard, total), min((rank + 1) * self.shard, total)
        self.pieces = []  # (param, first element, last element + 1, position in the shard)
        for p, off, n in zip(self.params, self.offsets, self.numels):
            a, b = max(off, lo), min(off + n, hi)
            if a < b:
                self.pieces.append((p, a - off, b - off, a - lo))
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.exp_avg = torch.zeros(hi - lo, dtype=torch.float32, device=dev)
        self.exp_avg_sq = torch.zeros(hi - lo, dtype=torch.float32, device=dev)
        wd_of = {id(p): wd for p, wd in params_wd}
        self.weight_decay = torch.zeros(hi - lo, dtype=torch.float32, device=dev)
        for p, a, b, s in self.pieces:
            self.weight_decay[s: s + b - a] = wd_of[id(p)]
        self.step = 0

    def _flat(self, tensors_of) -> torch.Tensor:
        return torch.cat([tensors_of(p).reshape(-1)[a:b] for p, a, b, _ in self.pieces]) if self.pieces \
            else self.exp_avg.new_zeros(0)

    def update(self, lr: float, beta1: float, beta2: float, eps: float, grad_shard=None) -> None:
        """One AdamW step of this rank's shard; ``grad_shard`` (ZeRO-2) replaces the shard of p.grad."""
        self.step += 1
        if self.pieces:
            x = self._flat(lambda p: p.data).float()
            g = self._flat(lambda p: p.grad).float() if grad_shard is None else grad_shard
            x.mul_(1.0 - lr * self.weight_decay)
            self.exp_avg.lerp_(g, 1.0 - beta1)
            self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            bc1, bc2 = 1.0 - beta1 ** self.step, 1.0 - beta2 ** self.step
            denom = (self.exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(eps)
            x.addcdiv_(self.exp_avg, denom, value=-lr / bc1)
        else:
            x = self.exp_avg.new_zeros(0)
        self._scatter_into(self._all_gather(x), lambda p: p.data)

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's shard, end to end: [size * shard] (padding at the end)."""
        padded = local.new_zeros(self.shard)
        padded[: local.numel()] = local
        if self.size == 1:
            return padded
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)

    def _scatter_into(self, flat: torch.Tensor, target_of) -> None:
        for p, off, n in zip(self.params, self.offsets, self.numels):
            t = target_of(p)
            t.view(-1).copy_(flat[off: off + n].to(t.dtype))

    def full_state(self) -> dict:
        m, v = self._all_gather(self.exp_avg), self._all_gather(self.exp_avg_sq)
        return {p: {"exp_avg": m[off: off + n].view_as(p).clone(), "exp_avg_sq": v[off: off + n].view_as(p).clone(),
                    "step": float(self.step)}
                for p, off, n in zip(self.params, self.offsets, self.numels)}

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
    """

    shards_gradients = False

    def __init__(self, model: torch.nn.Module, opt_cfg, ps):
        self.param_groups = param_groups(model, opt_cfg.weight_decay)
        for g in self.param_groups:
            g["lr"] = opt_cfg.lr
        self.betas, self.eps = (opt_cfg.adam_beta1, opt_cfg.adam_beta2), opt_cfg.adam_eps
        dense = [(p, g["weight_decay"]) for g in self.param_groups for p in g["params"] if not is_expert(p)]
        expert = [(p, g["weight_decay"]) for g in self.param_groups for p in g["params"] if is_expert(p)]
        self.domains = [_Domain(dense, ps.dp_group, ps.dp_size, ps.dp_rank),
                        _Domain(expert, ps.edp_group, ps.edp_size, ps.edp_rank)]

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for d in self.domains:
            d.update(lr, self.betas[0], self.betas[1], self.eps)

    def state_by_param(self) -> dict:
        """Full per-parameter Adam state (collective over each domain's group)."""
        out = {}
        for d in self.domains:
            out.update(d.full_state())
        return out

    def load_state_by_param(self, state: dict) -> None:
        for d in self.domains:
            d.load_full_state(state)
