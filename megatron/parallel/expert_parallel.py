"""Expert parallelism applied from outside the model.

Each MoE layer's ``experts`` module (holding E_l = E / ep local experts) gets hooks: the input
buffer [E, C, H] is exchanged with an all-to-all so that each rank receives the tokens of all EP
ranks for its experts ([E_l, ep * C, H]), and the output goes back the same way. Capacity is
agreed (MAX) across the EP group before dispatch, so ranks never disagree on buffer shapes.
Parameter names do not change, so checkpoints are layout-independent.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Autograd-aware all_to_all_single along dim 0 (its backward is the same exchange)."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return None, out


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    return _AllToAll.apply(group, x)


def _agree_capacity(group, device):
    def agree(capacity: int) -> int:
        t = torch.tensor([capacity], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return int(t.item())
    return agree


def apply_expert_parallel(model: torch.nn.Module, ps) -> None:
    """Wire every MoE layer of ``model`` for expert parallelism over ``ps.ep_group``."""
    if ps.ep_size == 1:
        return
    from megatron.model.moe.layer import MoELayer

    ep, group = ps.ep_size, ps.ep_group
    for module in model.modules():
        if not isinstance(module, MoELayer):
            continue
        experts = module.experts
        E_l = experts.num_local

        def pre_hook(mod, args, E_l=E_l):
            buf, = args  # [E, C, H], experts of rank j at rows j*E_l .. (j+1)*E_l
            E, C, H = buf.shape
            recv = all_to_all(buf.reshape(ep, E_l * C * H), group)  # [ep(src), E_l*C*H]
            recv = recv.view(ep, E_l, C, H).transpose(0, 1).reshape(E_l, ep * C, H)  # [E_l, ep*C, H]
            return (recv,)

        def post_hook(mod, args, out, E_l=E_l):
            _, epC, H = out.shape  # [E_l, ep*C, H]
            C = epC // ep
            send = out.view(E_l, ep, C, H).transpose(0, 1).reshape(ep, E_l * C * H)  # [ep(dst), ...]
            return all_to_all(send, group).view(ep * E_l, C, H)  # [E, C, H]

        experts.register_forward_pre_hook(pre_hook)
        experts.register_forward_hook(post_hook)
        experts.is_expert_parallel = True
        experts.agree_capacity = _agree_capacity(group, ps.device)
