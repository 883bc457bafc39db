"""Splitting the MoE layer's tokens over the tensor-parallel ranks, and gathering them back.

Under tensor parallelism the MoE layer is replicated: every TP rank routes the same tokens. Running the
experts on all of them on every TP rank would repeat the expert work (and the all-to-all) TP times. The
paper's parallelism-coordinated communication (DeepSpeed's ``drop_tokens`` / ``gather_tokens``) instead
gives each TP rank 1/TP of the dispatched tokens after routing, runs the experts and the all-to-all on
that share only, and all-gathers the experts' output before the combine, which stays replicated.

Two autograd functions along one dimension of a tensor that is identical on every TP rank:

- :func:`split_to_tp`: forward keeps this rank's chunk (the dimension padded with zeros to a multiple of
  TP, so chunks are equal); backward all-gathers the chunks' gradients, so the replicated input gets its
  full gradient on every rank (as a replicated region must);
- :func:`gather_from_tp`: forward all-gathers the chunks and drops the padding; backward keeps this rank's
  chunk of the (replicated) gradient.

The experts' weight gradients then cover only this rank's share of the tokens: they are summed over
the TP ranks with the expert-data-parallel reduction (the EDP group includes the TP ranks, see
``parallel_state``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def chunk_length(n: int, size: int) -> int:
    """Rows per TP rank when ``n`` rows are split over ``size`` ranks (the last chunks may be padding)."""
    return math.ceil(n / size) if n else 0


def _pad_along(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]  # F.pad lists dims from the last one
    return F.pad(x, pad)


def _all_gather_along(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _SplitToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, rank, size):
        n = x.shape[dim]
        c = chunk_length(n, size)
        ctx.dim, ctx.group, ctx.size, ctx.n = dim, group, size, n
        return _pad_along(x, dim, c * size).narrow(dim, rank * c, c).contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = _all_gather_along(grad, ctx.dim, ctx.group, ctx.size)
        return full.narrow(ctx.dim, 0, ctx.n), None, None, None, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, n, group, rank, size):
        ctx.dim, ctx.rank, ctx.c, ctx.size = dim, rank, x.shape[dim], size
        return _all_gather_along(x, dim, group, size).narrow(dim, 0, n)

    @staticmethod
    def backward(ctx, grad):
        full = _pad_along(grad, ctx.dim, ctx.c * ctx.size)
        return full.narrow(ctx.dim, ctx.rank * ctx.c, ctx.c).contiguous(), None, None, None, None, None


def split_to_tp(x: torch.Tensor, dim: int, group, rank: int, size: int) -> torch.Tensor:
    """This TP rank's chunk of ``x`` along ``dim``: ceil(n / size) entries (zero-padded at the end)."""
    return _SplitToTP.apply(x, dim, group, rank, size)


def gather_from_tp(x: torch.Tensor, dim: int, n: int, group, rank: int, size: int) -> torch.Tensor:
    """The TP ranks' chunks of ``dim`` concatenated and cut to its first ``n`` entries."""
    return _GatherFromTP.apply(x, dim, n, group, rank, size)


def chunk_counts(counts: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Per-expert rows of this rank's chunk of an expert-sorted row list with ``counts`` [E] rows per expert."""
    total = int(counts.sum())
    c = chunk_length(total, size)
    lo, hi = min(rank * c, total), min((rank + 1) * c, total)
    end = torch.cumsum(counts, 0)  # [E] one past each expert's last row
    start = end - counts  # [E]
    return (torch.clamp(end, max=hi) - torch.clamp(start, min=lo)).clamp_(min=0)  # [E]
