"""The experts' autograd functions with gradient-accumulation fusion: the backward writes the weight and
bias gradients straight into ``.grad`` (created when None, accumulated in place otherwise) and returns
only the input's gradient. Used by :class:`megatron.model.moe.experts.StackedExperts` (see its module
docstring for when); the experts module is passed in as a plain argument, so its parameters are not
graph inputs, and each finished gradient is reported through ``experts.notify_grad_ready(param)``.

Shapes: E local experts, C rows per expert (padded), N rows sorted by expert, H hidden, F ffn hidden.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm; its CPU backward needs a contiguous incoming gradient."""
    y = torch._grouped_mm(x.contiguous(), w, offs=offs)
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


class FusedWgradExperts(torch.autograd.Function):
    """GeLU experts on [E, C, H]; the weight gradients are ``baddbmm_``-ed into ``.grad``."""

    @staticmethod
    def forward(ctx, buf, experts):
        # buf [E, C, H] -> [E, C, H]
        h = torch.baddbmm(experts.b1[:, None, :], buf, experts.w1)  # [E, C, F]
        a = F.gelu(h)  # [E, C, F]
        ctx.save_for_backward(buf, h, a)
        ctx.experts = experts
        return torch.baddbmm(experts.b2[:, None, :], a, experts.w2)  # [E, C, H]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        # gy [E, C, H] -> grad of buf [E, C, H]; weight and bias gradients go to .grad
        buf, h, a = ctx.saved_tensors
        ex = ctx.experts
        gy = gy.contiguous()
        _accumulate_bmm(ex, ex.w2, a.transpose(1, 2), gy)  # [E, F, C] @ [E, C, H] -> [E, F, H]
        _accumulate_sum(ex, ex.b2, gy)  # [E, H]
        gh = torch.ops.aten.gelu_backward(torch.bmm(gy, ex.w2.transpose(1, 2)), h)  # [E, C, F]
        _accumulate_bmm(ex, ex.w1, buf.transpose(1, 2), gh)  # [E, H, C] @ [E, C, F] -> [E, H, F]
        _accumulate_sum(ex, ex.b1, gh)  # [E, F]
        gbuf = torch.bmm(gh, ex.w1.transpose(1, 2)) if ctx.needs_input_grad[0] else None  # [E, C, H]
        return gbuf, None


class FusedWgradGroupedExperts(torch.autograd.Function):
    """The grouped (no padding) GeLU experts over rows sorted by expert, weight gradients into ``.grad``.

    Forward and the input gradient use ``torch._grouped_mm``; the weight gradient: see _accumulate_grouped.
    """

    @staticmethod
    def forward(ctx, x, counts, offs, expert_of_row, experts):
        # x [N, H] sorted by expert, counts [E], offs [E] int32 end offsets, expert_of_row [N] -> [N, H]
        h = grouped_mm(x, experts.w1, offs) + experts.b1.index_select(0, expert_of_row)  # [N, F]
        a = F.gelu(h)  # [N, F]
        ctx.save_for_backward(x, h, a, counts, offs, expert_of_row)
        ctx.experts = experts
        return grouped_mm(a, experts.w2, offs) + experts.b2.index_select(0, expert_of_row)  # [N, H]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        # gy [N, H] -> grad of x [N, H]; weight and bias gradients go to .grad
        x, h, a, counts, offs, expert_of_row = ctx.saved_tensors
        ex = ctx.experts
        gy = gy.contiguous()
        _accumulate_grouped(ex, ex.w2, a, gy, offs, counts)  # per expert [F, n] @ [n, H] -> [E, F, H]
        _accumulate_rows(ex, ex.b2, gy, expert_of_row)  # [E, H]
        gh = torch.ops.aten.gelu_backward(grouped_mm(gy, ex.w2.transpose(1, 2), offs), h)  # [N, F]
        _accumulate_grouped(ex, ex.w1, x, gh, offs, counts)  # per expert [H, n] @ [n, F] -> [E, H, F]
        _accumulate_rows(ex, ex.b1, gh, expert_of_row)  # [E, F]
        gx = grouped_mm(gh, ex.w1.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None  # [N, H]
        return gx, None, None, None, None


def _accumulate_grouped(experts, p, a, b, offs, counts) -> None:
    """p.grad[e] += a[rows of e]^T @ b[rows of e] for every expert e, one ``addmm_`` per expert into its
    slice (in place); p.grad created by one ``torch._grouped_mm`` when None. CPU only (the counts are
    read on the host)."""
    if not p.requires_grad:
        return
    if p.grad is None:
        p.grad = torch._grouped_mm(a.t(), b, offs=offs)  # [E, X, Y]; experts without rows get zeros
    else:
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                p.grad[e].addmm_(a[start:start + n].t(), b[start:start + n])
            start += n
    experts.notify_grad_ready(p)


def _accumulate_rows(experts, p, g, expert_of_row) -> None:
    """p.grad[e] += sum of g's rows of expert e (g [N, X] -> [E, X])."""
    if not p.requires_grad:
        return
    if p.grad is None:
        p.grad = g.new_zeros(p.shape).index_add_(0, expert_of_row, g)
    else:
        p.grad.index_add_(0, expert_of_row, g)
    experts.notify_grad_ready(p)


def _accumulate_bmm(experts, p, a, b) -> None:
    """p.grad += a @ b (batched) in place, or p.grad = a @ b when p has no gradient yet."""
    if not p.requires_grad:
        return
    if p.grad is None:
        p.grad = torch.bmm(a, b)
    else:
        p.grad.baddbmm_(a, b)
    experts.notify_grad_ready(p)


def _accumulate_sum(experts, p, g) -> None:
    """p.grad += g summed over the token dim (g [E, C, X] -> [E, X])."""
    if not p.requires_grad:
        return
    if p.grad is None:
        p.grad = g.sum(1)
    else:
        p.grad.add_(g.sum(1))
    experts.notify_grad_ready(p)
