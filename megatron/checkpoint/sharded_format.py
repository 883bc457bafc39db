"""Checkpoint format 2: sharded, written by every rank in parallel through ``torch.distributed.checkpoint``.

::

    iter_0000100/
        common.pt, rng/rank_*.pt     shared by every format (``megatron.checkpoint.layout``)
        shards/.metadata             DCP's index: every tensor's full shape and where each box of it is stored
        shards/__{r}_0.distcp        what rank r wrote: the boxes it owns (nobody else's)

Every tensor is stored at its full, layout-independent shape, under a name that does not depend on
the layout:

- ``model.<parameter name>``: the weight as if TP were 1; an expert stack ``[E_global, ...]`` as if EP were 1;
- ``optim.<parameter name>.exp_avg`` / ``.exp_avg_sq`` (fp32, the parameter's full shape) and ``.step``.

Each rank writes the boxes it holds (``megatron.checkpoint.boxes``): its TP shard, its experts, its
ZeRO-1/2 flat shard of the Adam moments, its FSDP2 shard; a box several ranks hold (a replicated
weight) is written by one of them, DCP spreading those duplicates over the ranks by size. No rank
gathers anything, so the bytes written per rank and each rank's memory at save follow its shard.
A load asks DCP for the boxes this rank needs in *its* layout (any TP, EP, DP, ZeRO or FSDP2 layout)
and DCP reads only the stored pieces that overlap them, straight into the parameters and Adam
moments, in place. Loads are local: each rank plans its own reads (no collective).

The format's interface, as ``megatron.checkpoint.formats`` registers it: :data:`VERSION`, :func:`write`,
:func:`write_weights`, :func:`read`, :func:`describe_files`; :func:`state_for_save` and :func:`write_state`
split a save in two for ``--async-save`` (take the boxes now, write them later).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _write_item  # one piece at a time (below)
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from megatron.checkpoint.boxes import Box, Placement, ShardBoxes, flat_boxes, runs
from megatron.checkpoint.dcp_reader import SafeReader
from megatron.checkpoint.optimizer_state import adam_steps, local_adam_pieces, set_adam_steps
from megatron.errors import UserError
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_tp_sharded
from megatron.parallel.tensor_parallel import full_shape

VERSION = 2
SHARDS_DIR = "shards"
MODEL, OPTIM = "model.", "optim."


@dataclass
class _Geometry:
    """Where one parameter's local tensor sits in its full tensor."""

    name: str
    param: torch.Tensor
    local: torch.Tensor  # the local tensor (a DTensor's local shard)
    full_shape: tuple[int, ...]
    shift: tuple[int, ...]  # added to local coordinates first (FSDP2 shard offset, first local expert)
    tp: Placement  # then TP runs along the TP dim

    def to_full(self, box: Box) -> list[Box]:
        shifted = Box(tuple(o + s for o, s in zip(box.offsets, self.shift)), box.data)
        return self.tp.to_full(shifted)

    def boxes(self, data: torch.Tensor, start: int = 0) -> list[Box]:
        """Full-tensor boxes of ``data``: elements [start, start + numel) of the flattened local tensor (all of it
        when ``start`` is 0 and the sizes match)."""
        if start == 0 and data.numel() == self.local.numel():
            local = [Box((0,) * self.local.dim(), data.view(self.local.shape))]
        else:
            local = flat_boxes(data.reshape(-1), tuple(self.local.shape), start)
        return [b for lb in local if lb.data.numel() for b in self.to_full(lb)]


def _geometries(model, ps) -> dict:
    """_Geometry of every parameter, by parameter."""
    experts = {}
    for m in model.modules():
        if isinstance(m, MoELayer):
            for p in m.experts.parameters(recurse=False):
                experts[p] = (m.experts.first_expert, m.num_experts)
    tp_rank = ps.tp_rank if ps is not None else 0
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p.data
        shift = [0] * p.dim()
        if isinstance(p, DTensor):
            shift = list(p.__create_chunk_list__()[0].offsets)
        shape = list(full_shape(p))
        if p in experts:
            first, total = experts[p]
            shift[0] += first
            shape[0] = total
        if is_tp_sharded(p):
            tp = Placement(tuple(shape), p.tp_dim, tuple(runs(p.tp_indices[tp_rank].tolist())))
        else:
            tp = Placement(tuple(shape))
        out[p] = _Geometry(name, p, local, tuple(shape), tuple(shift), tp)
    return out


def _model_state(geos: dict) -> dict:
    """``model.<name>``: this rank's boxes of every parameter (views of the live tensors)."""
    return {MODEL + g.name: ShardBoxes(g.full_shape, g.boxes(g.local), g.local.dtype) for g in geos.values()}


def _adam_state(geos: dict, optimizer, create: bool = False) -> dict:
    """``optim.<name>.exp_avg`` / ``.exp_avg_sq``: this rank's boxes of the Adam moments (views into the optimizer's
    state or shards; ``create`` allocates a fresh torch optimizer's state first)."""
    boxes: dict = {}
    for p, start, m, v in local_adam_pieces(optimizer, create=create):
        mb, vb = boxes.setdefault(p, ([], []))
        mb.extend(geos[p].boxes(m, start))
        vb.extend(geos[p].boxes(v, start))
    out = {}
    for p, (mb, vb) in boxes.items():
        g = geos[p]
        out[f"{OPTIM}{g.name}.exp_avg"] = ShardBoxes(g.full_shape, mb, torch.float32)
        out[f"{OPTIM}{g.name}.exp_avg_sq"] = ShardBoxes(g.full_shape, vb, torch.float32)
    return out


def state_for_save(model, optimizer, ps, save_optim: bool) -> dict:
    """The DCP state dict of this rank's boxes: the model's parameters and, with ``save_optim``, the Adam state
    (views of the live tensors: write them before the next optimizer step, or :func:`staged` copies)."""
    geos = _geometries(model, ps)
    state = _model_state(geos)
    if save_optim and optimizer is not None:
        state.update(_adam_state(geos, optimizer))
        for p, step in adam_steps(optimizer).items():
            state[f"{OPTIM}{geos[p].name}.step"] = torch.tensor(float(step), dtype=torch.float64)
    return state


def staged(state: dict) -> dict:
    """A host copy of ``state`` whose boxes own their data (for a save that runs while training goes on; on a GPU
    the copy is in host memory, so the background write holds no device memory)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, ShardBoxes):
            out[k] = ShardBoxes(tuple(v.shape), [Box(b.offsets, b.data.detach().to("cpu", copy=True))
                                                 for b in v.boxes], v.dtype)
        else:
            out[k] = v.detach().to("cpu", copy=True)
    return out


class _StreamingWriter(FileSystemWriter):
    """DCP's file-system writer, one file per rank, written one piece at a time: a piece that is a view into a
    larger tensor (ZeRO's parameters and Adam shards, TP runs) is copied just before it is written and freed
    right after. (DCP's own loop keeps every such copy until the rank's file is complete: a ZeRO save then
    holds a second copy of everything the rank writes.) The file is fsync'ed before the index names it."""

    def write_data(self, plan, planner):
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            for item in plan.items:
                data = planner.resolve_data(item)
                if isinstance(data, torch.Tensor):
                    data = data.detach().cpu()
                    if data.untyped_storage().nbytes() != data.numel() * data.element_size():
                        data = data.clone()  # torch.save would write the whole underlying storage
                results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                del data
            stream.flush()
            os.fsync(stream.fileno())
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(results)
        return done


def write_state(folder: str, state: dict, ps, group=None) -> None:
    """Write ``state`` into ``folder/shards`` (collective over ``group``, default all ranks, when distributed):
    every rank writes its own file, the coordinator the index."""
    shards = os.path.join(folder, SHARDS_DIR)
    os.makedirs(shards, exist_ok=True)
    writer = _StreamingWriter(shards, single_file_per_rank=True, thread_count=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
            if ps is not None and ps.distributed:
                dcp.save(state, storage_writer=writer, process_group=group)
            else:
                dcp.save(state, storage_writer=writer, no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException) - a full disk or an unwritable folder, on this rank or another
        raise UserError(f"--save: writing the shards into {shards} failed ({_reason(e)}); the previous checkpoint "
                        f"is intact: free space or fix the folder and save again") from None


def _reason(e: BaseException) -> str:
    """The first line of the underlying error of a DCP failure (its per-rank failures hold the real one)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {type(inner).__name__}: {str(inner).strip().splitlines()[0] if str(inner).strip() else ''}"
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def write(folder: str, model, optimizer, ps, save_optim: bool) -> None:
    """Every rank: write this rank's boxes of the model (and, with ``save_optim``, of the Adam state) into the
    checkpoint folder ``folder``, in parallel with the other ranks."""
    write_state(folder, state_for_save(model, optimizer, ps, save_optim), ps, ps.world_group)


def write_weights(folder: str, model) -> None:
    """One process: write the weights of ``model`` (a GPTModel with every expert local) into ``folder``, with
    no optimizer state."""
    write_state(folder, state_for_save(model, None, None, False), None)


def _metadata(path: str, flag: str):
    """DCP's index of the checkpoint folder ``path``, read safely (``megatron.checkpoint.dcp_reader``)."""
    md = SafeReader(os.path.join(path, SHARDS_DIR), flag).read_metadata()
    if not hasattr(md, "state_dict_metadata"):
        raise UserError(f"{flag}: {os.path.join(path, SHARDS_DIR, '.metadata')} is not a shard index; the checkpoint "
                        f"is damaged: load an earlier one")
    return md


def read(path: str, model, optimizer, ps, want_optim: bool, flag: str = "--load") -> None:
    """Fill this rank's part of ``model`` (and, when ``want_optim`` and the checkpoint holds Adam state, of
    ``optimizer``) from the checkpoint folder ``path``, in place, in this rank's layout. A missing tensor or
    a shape other than the model's is a UserError naming the checkpoint; nothing is read then."""
    md = _metadata(path, flag).state_dict_metadata
    geos = _geometries(model, ps)
    for g in geos.values():
        key = MODEL + g.name
        if key not in md:
            raise UserError(f"{flag}: parameter {g.name} is missing from {path}; the checkpoint does not match the model")
        stored = md[key]
        if not isinstance(stored, TensorStorageMetadata) or tuple(stored.size) != g.full_shape:
            got = tuple(stored.size) if isinstance(stored, TensorStorageMetadata) else "no tensor"
            raise UserError(f"{flag}: {g.name} has shape {got} in the checkpoint but {g.full_shape} in the model; "
                            f"pass the flags it was trained with")
    state = _model_state(geos)
    load_optim = want_optim and optimizer is not None and any(k.startswith(OPTIM) for k in md)
    steps = {}
    if load_optim:
        state.update(_adam_state(geos, optimizer, create=True))
        for p in adam_steps(optimizer):
            name = f"{OPTIM}{geos[p].name}"
            if f"{name}.exp_avg" not in md or f"{name}.step" not in md:
                raise UserError(f"{flag}: {path} holds Adam state for some parameters but not for {geos[p].name}; "
                                f"load it with --no-load-optim")
            steps[p] = state[f"{name}.step"] = torch.zeros((), dtype=torch.float64)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with torch.no_grad():
                dcp.load(state, storage_reader=SafeReader(os.path.join(path, SHARDS_DIR), flag), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (CheckpointException is a BaseException) - a damaged shard file
        raise UserError(f"{flag}: cannot read the shards of {path} ({_reason(e)}); the checkpoint is damaged: "
                        f"load an earlier one") from None
    if load_optim:
        set_adam_steps(optimizer, {p: float(t) for p, t in steps.items()})


def describe_files(path: str) -> dict:
    """What the checkpoint folder ``path`` holds: ``files`` and ``shard_files`` (counts), ``bytes``, ``tensors``
    (stored tensors), ``optimizer_state`` (whether Adam state was saved) and ``detail`` (one line for inspect)."""
    files = []
    for root, _, names in os.walk(path):
        for n in names:
            files.append((os.path.relpath(os.path.join(root, n), path), os.path.getsize(os.path.join(root, n))))
    md = _metadata(path, "inspect").state_dict_metadata
    shards = sum(1 for f, _ in files if f.endswith(".distcp"))
    return {"files": len(files), "shard_files": shards, "bytes": sum(s for _, s in files), "tensors": len(md),
            "optimizer_state": any(k.startswith(OPTIM) for k in md),
            "detail": f"format 2, sharded: {shards} rank shard files, {len(md)} tensors"}
