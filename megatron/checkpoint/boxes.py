"""Boxes: the pieces of a full tensor one rank holds, and the tensor type that hands them to
``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint stores every tensor at its full, layout-independent shape (a dense weight as if
TP were 1, an expert stack ``[E_global, ...]`` as if EP were 1). What one rank holds of it is a set
of **boxes**: rectangular pieces, each a (global offsets, local data) pair. Three kinds of
sharding meet here, and each maps to boxes without copying data:

- tensor parallelism: a TP shard is the full tensor's rows (or columns) ``indices[tp_rank]``; the
  index list breaks into runs of consecutive indices, one box per run (qkv's heads give three runs);
- expert parallelism: an expert stack's local experts are rows ``first_expert ...`` of the global stack;
- ZeRO-1 / ZeRO-2: a rank owns a contiguous **flat** range of a parameter, which
  :func:`flat_range_boxes` cuts into at most ``2 * ndim - 1`` boxes, each itself contiguous in memory;
- FSDP2: a DTensor's local shard is one box of its (TP-local) tensor.

DCP reshards by intersecting boxes: a load asks for the boxes this rank needs, in any layout, and
DCP reads the overlapping parts of whatever boxes the save wrote. :class:`ShardBoxes` implements
DCP's checkpointable protocol (``__create_write_items__``, ``__create_chunk_list__``,
``__get_tensor_shard__``) for a list of boxes; it is a wrapper tensor with the global shape and no
storage of its own, used only as a value of the state dict handed to DCP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


@dataclass
class Box:
    """A piece of a full tensor: its ``offsets`` in the full tensor and ``data`` (a view; its shape is the size)."""

    offsets: tuple[int, ...]
    data: torch.Tensor


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of boxes that exactly cover elements [start, end) of a row-major tensor of ``shape``,
    in order; each box is contiguous in row-major order, so its data is a reshaped slice of the flat range."""
    if start >= end:
        return []
    if len(shape) <= 1:
        return [((start,), (end - start,))] if shape else [((), ())]
    inner = 1
    for s in shape[1:]:
        inner *= s
    out = []
    row, col = divmod(start, inner)
    if col:  # a partial first row
        stop = min(end, (row + 1) * inner)
        out += [((row,) + o, (1,) + z) for o, z in flat_range_boxes(shape[1:], col, stop - row * inner)]
        start, row = stop, row + 1
    full_rows = (end - start) // inner
    if full_rows > 0:
        out.append(((row,) + (0,) * (len(shape) - 1), (full_rows,) + tuple(shape[1:])))
        start += full_rows * inner
        row += full_rows
    if start < end:  # a partial last row
        out += [((row,) + o, (1,) + z) for o, z in flat_range_boxes(shape[1:], 0, end - start)]
    return out


def flat_boxes(data: torch.Tensor, shape: tuple[int, ...], start: int) -> list[Box]:
    """Boxes (in the coordinates of a tensor of ``shape``) of ``data``, a 1-D tensor holding that tensor's
    flat elements ``[start, start + len(data))``; each box's data is a view of ``data``."""
    boxes, pos = [], 0
    for offsets, sizes in flat_range_boxes(tuple(shape), start, start + data.numel()):
        n = 1
        for s in sizes:
            n *= s
        boxes.append(Box(tuple(offsets), data[pos: pos + n].view(sizes)))
        pos += n
    return boxes


def runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """(local start, global start, length) of each run of consecutive values in ``indices``."""
    out = []
    for i, g in enumerate(indices):
        if out and out[-1][1] + out[-1][2] == g:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, g, 1))
    return out


@dataclass
class Placement:
    """Where one rank's local tensor of a parameter sits in the full tensor: along ``dim`` its local index i is
    full index ``index_runs``-mapped (runs of (local start, global start, length)); other dims are unchanged.
    ``full_shape``: the full tensor's shape. ``dim`` None: the local tensor is the full tensor."""

    full_shape: tuple[int, ...]
    dim: int | None = None
    index_runs: tuple[tuple[int, int, int], ...] = ()

    def to_full(self, box: Box) -> list[Box]:
        """The box (in local coordinates) cut at run boundaries and moved to full-tensor coordinates."""
        if self.dim is None:
            return [box]
        d = self.dim
        lo, n = box.offsets[d], box.data.shape[d]
        out = []
        for ls, gs, length in self.index_runs:
            a, b = max(lo, ls), min(lo + n, ls + length)
            if a < b:
                offsets = list(box.offsets)
                offsets[d] = gs + (a - ls)
                out.append(Box(tuple(offsets), box.data.narrow(d, a - lo, b - a)))
        return out


class ShardBoxes(torch.Tensor):
    """A state-dict value for DCP: the boxes of a full tensor of ``full_shape`` that this rank writes (at save)
    or fills (at load). It has the full shape and dtype but no storage; DCP reaches the boxes through the
    checkpointable protocol. On save every box is written (DCP drops duplicates that other ranks hold); on
    load DCP copies the overlapping parts of the stored boxes into each box's data, in place."""

    __slots__ = ["boxes"]

    @staticmethod
    def __new__(cls, full_shape, boxes: list[Box], dtype: torch.dtype):
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(full_shape), dtype=dtype, device="cpu")
        r.boxes = boxes
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"ShardBoxes holds checkpoint boxes only; {func} is not supported")

    def _properties(self) -> TensorProperties:
        return TensorProperties(dtype=self.dtype)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(b.offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=b.data.shape),
                              properties=self._properties(), size=self.shape))
                for b in self.boxes]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=b.data.shape) for b in self.boxes]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for b in self.boxes:
            if tuple(b.offsets) == tuple(index.offset):
                return b.data
        raise ValueError(f"no box of {index.fqn} at offset {tuple(index.offset)}")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"ShardBoxes(shape={tuple(self.shape)}, boxes={len(self.boxes)})"
