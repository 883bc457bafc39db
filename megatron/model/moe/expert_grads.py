"""The experts' autograd functions with gradient-accumulation fusion: the backward writes the weight and
bias gradients straight into ``.grad`` (created when None, accumulated in place otherwise) and returns
only the input's gradient. Used by :class:`megatron.model.moe.experts.StackedExperts` (see its module
docstring for when); the experts module is passed in as a plain argument, so its parameters are not
graph inputs, and each finished gradient is reported through ``experts.notify_grad_ready(param)``.

The experts are GeLU (fc1 [H, F]) or SwiGLU (``gated``: fc1 [H, 2F], the gate columns then the up columns,
silu(gate) * up); biases are optional (None when the experts have none).

Shapes: E local experts, C rows per expert (padded), N rows sorted by expert, H hidden, F ffn hidden,
F1 = F (GeLU) or 2F (SwiGLU).
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


def activation(h: torch.Tensor, gated: bool) -> torch.Tensor:
    """The experts' activation: h [..., F] -> gelu(h), or gated h [..., 2F] -> silu(gate) * up [..., F]."""
    if not gated:
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def activation_backward(ga: torch.Tensor, h: torch.Tensor, gated: bool) -> torch.Tensor:
    """The gradient of :func:`activation` at h, given the gradient ``ga`` [..., F] of its output -> [..., F1]."""
    if not gated:
        return torch.ops.aten.gelu_backward(ga, h)
    gate, up = h.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(ga * up, gate), ga * F.silu(gate)], dim=-1)


def bmm_bias(bias, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [E, C, X] @ w [E, X, Y] (+ bias [E, Y] when not None) -> [E, C, Y]."""
    return torch.bmm(x, w) if bias is None else torch.baddbmm(bias[:, None, :], x, w)


def grouped_bias(bias, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, expert_of_row: torch.Tensor):
    """Rows x [N, X] sorted by expert @ their expert's w [E, X, Y] (+ its bias [E, Y] when not None) -> [N, Y]."""
    y = grouped_mm(x, w, offs)
    return y if bias is None else y + bias.index_select(0, expert_of_row)


class FusedWgradExperts(torch.autograd.Function):
    """The experts on [E, C, H]; the weight gradients are ``baddbmm_``-ed into ``.grad``."""

    @staticmethod
    def forward(ctx, buf, experts):
        # buf [E, C, H] -> [E, C, H]
        h = bmm_bias(experts.b1, buf, experts.w1)  # [E, C, F1]
        a = activation(h, experts.gated)  # [E, C, F]
        ctx.save_for_backward(buf, h, a)
        ctx.experts = experts
        return bmm_bias(experts.b2, a, experts.w2)  # [E, C, H]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        # gy [E, C, H] -> grad of buf [E, C, H]; weight and bias gradients go to .grad
        buf, h, a = ctx.saved_tensors
        ex = ctx.experts
        gy = gy.contiguous()
        _accumulate_bmm(ex, ex.w2, a.transpose(1, 2), gy)  # [E, F, C] @ [E, C, H] -> [E, F, H]
        _accumulate_sum(ex, ex.b2, gy)  # [E, H]
        gh = activation_backward(torch.bmm(gy, ex.w2.transpose(1, 2)), h, ex.gated)  # [E, C, F1]
        _accumulate_bmm(ex, ex.w1, buf.transpose(1, 2), gh)  # [E, H, C] @ [E, C, F1] -> [E, H, F1]
        _accumulate_sum(ex, ex.b1, gh)  # [E, F]
        gbuf = torch.bmm(gh, ex.w1.transpose(1, 2)) if ctx.needs_input_grad[0] else None  # [E, C, H]
        return gbuf, None


class FusedWgradGroupedExperts(torch.autograd.Function):
    """The grouped (no padding) experts over rows sorted by expert, weight gradients into ``.grad``.

    Forward and the input gradient use ``torch._grouped_mm``; the weight gradient: see _accumulate_grouped.
    """

    @staticmethod
    def forward(ctx, x, counts, offs, expert_of_row, experts):
        # x [N, H] sorted by expert, counts [E], offs [E] int32 end offsets, expert_of_row [N] -> [N, H]
        h = grouped_bias(experts.b1, x, experts.w1, offs, expert_of_row)  # [N, F1]
        a = activation(h, experts.gated)  # [N, F]
        ctx.save_for_backward(x, h, a, counts, offs, expert_of_row)
        ctx.experts = experts
        return grouped_bias(experts.b2, a, experts.w2, offs, expert_of_row)  # [N, H]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        # gy [N, H] -> grad of x [N, H]; weight and bias gradients go to .grad
        x, h, a, counts, offs, expert_of_row = ctx.saved_tensors
        ex = ctx.experts
        gy = gy.contiguous()
        _accumulate_grouped(ex, ex.w2, a, gy, offs, counts)  # per expert [F, n] @ [n, H] -> [E, F, H]
        _accumulate_rows(ex, ex.b2, gy, expert_of_row)  # [E, H]
        gh = activation_backward(grouped_mm(gy, ex.w2.transpose(1, 2), offs), h, ex.gated)  # [N, F1]
        _accumulate_grouped(ex, ex.w1, x, gh, offs, counts)  # per expert [H, n] @ [n, F1] -> [E, H, F1]
        _accumulate_rows(ex, ex.b1, gh, expert_of_row)  # [E, F]
        gx = grouped_mm(gh, ex.w1.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None  # [N, H]
        return gx, None, None, None, None


def _accumulate_grouped(experts, p, a, b, offs, counts) -> None:
    """p.grad[e] += a[rows of e]^T @ b[rows of e] for every expert e, one ``addmm_`` per expert into its
    slice (in place); p.grad created by one ``torch._grouped_mm`` when None. CPU only (the counts are
    read on the host)."""
    if p is None or not p.requires_grad:  # p None: experts without biases
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
    if p is None or not p.requires_grad:  # p None: experts without biases
        return
    if p.grad is None:
        p.grad = g.new_zeros(p.shape).index_add_(0, expert_of_row, g)
    else:
        p.grad.index_add_(0, expert_of_row, g)
    experts.notify_grad_ready(p)


def _accumulate_bmm(experts, p, a, b) -> None:
    """p.grad += a @ b (batched) in place, or p.grad = a @ b when p has no gradient yet."""
    if p is None or not p.requires_grad:  # p None: experts without biases
        return
    if p.grad is None:
        p.grad = torch.bmm(a, b)
    else:
        p.grad.baddbmm_(a, b)
    experts.notify_grad_ready(p)


def _accumulate_sum(experts, p, g) -> None:
    """p.grad += g summed over the token dim (g [E, C, X] -> [E, X])."""
    if p is None or not p.requires_grad:  # p None: experts without biases
        return
    if p.grad is None:
        p.grad = g.sum(1)
    else:
        p.grad.add_(g.sum(1))
    experts.notify_grad_ready(p)
