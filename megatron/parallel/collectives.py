"""Every collective the layers above use, in one place.

Plain ones (sums and flags over a group, the identity in one process) and the autograd functions of
tensor parallelism, each a pair of adjoint operations on a tensor that is replicated or sharded over
the TP group:

- :func:`copy_to_tp` / :func:`reduce_from_tp`: Megatron's f and g around column- and row-parallel ops;
- :func:`split_to_tp` / :func:`gather_from_tp`: one dimension cut into equal chunks (zero-padded to a
  multiple of TP) and put back together, used for the vocab-parallel logits and for the MoE layer's
  routed tokens under TP (``token_split.py``);
- :func:`gather_sequence` / :func:`reduce_scatter_sequence`: sequence parallelism's all-gather of the
  sequence shards before a column-parallel op (backward: the gradient summed over TP and cut to this
  rank's shard) and its adjoint after a row-parallel op (Megatron's g-bar and its transpose).

And those of expert parallelism's token dispatchers (``expert_parallel.py``, ``allgather_dispatcher.py``),
along dim 0 over the EP group, each run (forward and backward) inside an optional timer:

- :func:`all_to_all`: rows to each rank in blocks of given sizes (its backward swaps the sizes);
- :func:`all_gather_rows` / :func:`reduce_scatter_rows`: every rank's rows concatenated, and its adjoint,
  the sum over ranks of each rank's block (gloo has no reduce-scatter: there an all-to-all of the blocks,
  then their sum).
"""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.errors import UserError


def all_reduce_sum(t: torch.Tensor, ps, group=None) -> torch.Tensor:
    if ps.distributed:
        dist.all_reduce(t, group=group)
    return t


def any_rank(flag: bool, ps) -> bool:
    if not ps.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ps.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ps.world_group)
    return bool(t.item() > 0)


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient over TP (entry of a column-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward; identity backward (exit of a row-parallel op)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def agree_on_error(message: str | None, ps) -> None:
    """Every rank raises the first rank's error message (a one-line UserError), if any rank has one (one
    collective): a failure on some ranks only becomes an error on every rank instead of a hang."""
    if not ps.distributed:
        if message:
            raise UserError(message)
        return
    messages = [None] * ps.world_size
    dist.all_gather_object(messages, message, group=ps.world_group)
    first = next((m for m in messages if m), None)
    if first:
        raise UserError(first)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's f: identity forward, all-reduce of the gradient backward (entry of a column-parallel op)."""
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Megatron's g: all-reduce forward, identity backward (exit of a row-parallel op)."""
    return _ReduceFromTP.apply(x, group)


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
    """Keep this rank's chunk forward; all-gather the gradient backward."""

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
    """All-gather the chunks forward (padding dropped); keep this rank's chunk of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim, n, group, rank, size):
        ctx.dim, ctx.rank, ctx.c, ctx.size = dim, rank, x.shape[dim], size
        return _all_gather_along(x, dim, group, size).narrow(dim, 0, n)

    @staticmethod
    def backward(ctx, grad):
        full = _pad_along(grad, ctx.dim, ctx.c * ctx.size)
        return full.narrow(ctx.dim, ctx.rank * ctx.c, ctx.c).contiguous(), None, None, None, None, None


def _reduce_scatter_along(x: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    """x (identical shape on every TP rank, ``dim`` divisible by size) -> this rank's chunk of the sum over TP."""
    return _reduce_scatter_along0(x.movedim(dim, 0), group, size).movedim(0, dim).contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather of the sequence shards forward; the gradient summed over TP and cut to this shard backward."""

    @staticmethod
    def forward(ctx, x, dim, group, rank, size):
        ctx.dim, ctx.group, ctx.size = dim, group, size
        return _all_gather_along(x, dim, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_along(grad, ctx.dim, ctx.group, ctx.size), None, None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """This shard of the sum over TP forward (after a row-parallel op); the gradient all-gathered backward."""

    @staticmethod
    def forward(ctx, x, dim, group, rank, size):
        ctx.dim, ctx.group, ctx.size = dim, group, size
        return _reduce_scatter_along(x, dim, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_along(grad, ctx.dim, ctx.group, ctx.size), None, None, None, None


def gather_sequence(x: torch.Tensor, dim: int, group, rank: int, size: int) -> torch.Tensor:
    """Sequence parallelism: [.., T/TP, ..] shards -> the whole [.., T, ..] on every TP rank (entry of a
    column-parallel op; backward: reduce-scatter)."""
    return _GatherSequence.apply(x, dim % x.dim(), group, rank, size)


def reduce_scatter_sequence(x: torch.Tensor, dim: int, group, rank: int, size: int) -> torch.Tensor:
    """Sequence parallelism: a row-parallel op's partial [.., T, ..] -> this rank's shard of the sum over TP
    (backward: all-gather)."""
    return _ReduceScatterSequence.apply(x, dim % x.dim(), group, rank, size)


def split_to_tp(x: torch.Tensor, dim: int, group, rank: int, size: int) -> torch.Tensor:
    """This TP rank's chunk of ``x`` along ``dim``: ceil(n / size) entries (zero-padded at the end)."""
    return _SplitToTP.apply(x, dim % x.dim(), group, rank, size)


def gather_from_tp(x: torch.Tensor, dim: int, n: int, group, rank: int, size: int) -> torch.Tensor:
    """The TP ranks' chunks of ``dim`` concatenated and cut to its first ``n`` entries."""
    return _GatherFromTP.apply(x, dim % x.dim(), n, group, rank, size)


class _AllToAll(torch.autograd.Function):
    """Autograd-aware all_to_all_single along dim 0 with split sizes (its backward swaps them)."""

    @staticmethod
    def forward(ctx, group, x, out_splits, in_splits, timer):
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.timer = group, out_splits, in_splits, timer
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows,) + tuple(x.shape[1:]))
        with timer or contextlib.nullcontext():
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows = grad.shape[0] if ctx.in_splits is None else sum(ctx.in_splits)
        out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
        with ctx.timer or contextlib.nullcontext():
            dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return None, out, None, None, None


def all_to_all(x: torch.Tensor, group, out_splits=None, in_splits=None,
               timer: Optional[ContextManager] = None) -> torch.Tensor:
    """Rows of x go to the ranks of ``group`` in blocks of ``in_splits`` (equal blocks when None);
    the exchange (and its backward) runs inside ``timer`` when one is given."""
    return _AllToAll.apply(group, x, out_splits, in_splits, timer)


def _reduce_scatter_along0(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[size * n, ...] on every rank -> [n, ...]: this rank's block summed over the ranks."""
    if dist.get_backend(group) == "gloo":  # no reduce_scatter in gloo: all-to-all of the blocks, then their sum
        recv = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(recv, x.contiguous(), group=group)
        return recv.view((size, -1) + tuple(x.shape[1:])).sum(0)
    out = x.new_empty((x.shape[0] // size,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """All-gather along dim 0 forward; reduce-scatter (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group, size, timer):
        ctx.group, ctx.size, ctx.timer = group, size, timer
        with timer or contextlib.nullcontext():
            return _all_gather_along(x, 0, group, size)

    @staticmethod
    def backward(ctx, grad):
        with ctx.timer or contextlib.nullcontext():
            return _reduce_scatter_along0(grad, ctx.group, ctx.size), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    """Reduce-scatter (sum) along dim 0 forward; all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group, size, timer):
        ctx.group, ctx.size, ctx.timer = group, size, timer
        with timer or contextlib.nullcontext():
            return _reduce_scatter_along0(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        with ctx.timer or contextlib.nullcontext():
            return _all_gather_along(grad, 0, ctx.group, ctx.size), None, None, None


def all_gather_rows(x: torch.Tensor, group, size: int, timer: Optional[ContextManager] = None) -> torch.Tensor:
    """[n, ...] on each of the ``size`` ranks of ``group`` -> [size * n, ...], rank order; the gradient of
    each rank's rows is the sum of the ranks' gradients for them. Runs inside ``timer`` when given."""
    return _AllGatherRows.apply(x, group, size, timer)


def reduce_scatter_rows(x: torch.Tensor, group, size: int, timer: Optional[ContextManager] = None) -> torch.Tensor:
    """[size * n, ...] on each rank -> [n, ...]: this rank's block summed over the ranks (the adjoint of
    :func:`all_gather_rows`). Runs inside ``timer`` when given."""
    return _ReduceScatterRows.apply(x, group, size, timer)


def all_gather_values(x: torch.Tensor, group, size: int, timer: Optional[ContextManager] = None) -> torch.Tensor:
    """[n, ...] on each rank -> [size, n, ...] (no gradient: counts, indices)."""
    with timer or contextlib.nullcontext():
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)
