"""Checkpoint format 1: full tensors, the dense part in two files, each expert in a file of its own.

::

    iter_0000100/
        model_dense.pt                    every non-expert parameter, by name, full size (TP-gathered)
        optim_dense.pt                    Adam state of those parameters, by name, full size
        experts/layer_{L}_expert_{G}.pt   one expert (MoE layer index L, global expert id G): its weights
                                          and Adam state (``optim.<name>.exp_avg`` / ``exp_avg_sq`` / ``step``)

Full tensors load at any tensor-parallel size (each rank takes its shard), and experts stored by global
id load at any expert- or data-parallel size (each rank reads the experts it holds). Every shape is
checked on load, so a checkpoint of another architecture is refused rather than broadcast.

The format's interface, as ``megatron.checkpoint.formats`` registers it: :data:`VERSION`, :func:`write`,
:func:`write_weights`, :func:`read` and :func:`describe_files`.
"""
from __future__ import annotations

import os

import torch

from megatron.checkpoint.file_io import load_file, save_file
from megatron.checkpoint.optimizer_state import install_state_by_param, state_by_param
from megatron.errors import UserError
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_expert, is_tp_sharded
from megatron.parallel.tensor_parallel import full_shape, gather_tp, shard_tp

VERSION = 1
DENSE_MODEL_FILE = "model_dense.pt"
DENSE_OPTIM_FILE = "optim_dense.pt"
EXPERTS_DIR = "experts"


def expert_file(layer: int, expert: int) -> str:
    """The file of global expert ``expert`` of MoE layer ``layer``, relative to the checkpoint folder."""
    return os.path.join(EXPERTS_DIR, f"layer_{layer:03d}_expert_{expert:04d}.pt")


def expert_stacks(model):
    """(MoE layer index, StackedExperts module) for every MoE layer."""
    return [(m.layer_number, m.experts) for m in model.modules() if isinstance(m, MoELayer)]


def _full(t: torch.Tensor, p, ps) -> torch.Tensor:
    """The full (TP-gathered) CPU tensor of parameter p's local tensor t (collective over TP if sharded), in a
    storage of its own: a parameter that is a view into the ZeRO optimizers' flat buffer is copied, so that
    torch.save writes that tensor alone and not the whole buffer."""
    out = (gather_tp(t, p, ps) if is_tp_sharded(p) else t).detach().cpu()
    return out.clone() if out.untyped_storage().nbytes() > out.numel() * out.element_size() else out


def write(folder: str, model, optimizer, ps, save_optim: bool) -> None:
    """Every rank: write the model (and, with ``save_optim``, the Adam state of ``optimizer``) into the
    checkpoint folder ``folder``. The TP ranks of the first data-parallel replica gather full tensors
    (collective) and the main rank writes them; one replica of each expert writes that expert. (Format 1 is
    read by this version and written only on request: the sharded format 2 is the default.)"""
    opt_state = state_by_param(optimizer) if save_optim else {}
    named = dict(model.named_parameters())
    if ps.dp_rank == 0:  # the TP ranks of the first replica gather full tensors; rank 0 writes them
        dense = {n: _full(p, p, ps) for n, p in named.items() if not is_expert(p)}
        optim = {}
        for n, p in named.items():
            st = opt_state.get(p, {})
            if save_optim and not is_expert(p) and "exp_avg" in st:
                optim[n] = {"exp_avg": _full(st["exp_avg"], p, ps), "exp_avg_sq": _full(st["exp_avg_sq"], p, ps),
                            "step": float(st["step"])}
    if ps.is_main:
        save_file(dense, os.path.join(folder, DENSE_MODEL_FILE))
        if save_optim:
            save_file(optim, os.path.join(folder, DENSE_OPTIM_FILE))
    if ps.tp_rank == 0:  # one replica of each expert writes it: EDP rank 0 at its layer's EP degree
        for m in model.modules():
            if not isinstance(m, MoELayer) or ps.expert_groups(m.ep_size).edp_rank != 0:
                continue
            layer, experts = m.layer_number, m.experts
            for i in range(experts.num_local):
                g = experts.first_expert + i
                blob = {}
                for pname, p in experts.named_parameters(recurse=False):
                    blob[pname] = p.detach()[i].cpu().clone()
                    st = opt_state.get(p, {})
                    if save_optim and "exp_avg" in st:
                        blob[f"optim.{pname}.exp_avg"] = st["exp_avg"][i].cpu().clone()
                        blob[f"optim.{pname}.exp_avg_sq"] = st["exp_avg_sq"][i].cpu().clone()
                        blob[f"optim.{pname}.step"] = torch.tensor(float(st["step"]))
                save_file(blob, os.path.join(folder, expert_file(layer, g)))


def write_weights(folder: str, model) -> None:
    """One process: write the weights of ``model`` (a GPTModel with every expert local) into ``folder``,
    with no optimizer state."""
    os.makedirs(os.path.join(folder, EXPERTS_DIR), exist_ok=True)
    experts = {id(p) for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()}
    dense = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) not in experts}
    save_file(dense, os.path.join(folder, DENSE_MODEL_FILE))
    for m in model.modules():
        if isinstance(m, MoELayer):
            for g in range(m.experts.num_local):
                blob = {k: p.detach()[g].cpu().clone() for k, p in m.experts.named_parameters(recurse=False)}
                save_file(blob, os.path.join(folder, expert_file(m.layer_number, g)))


def read(path: str, model, optimizer, ps, want_optim: bool, flag: str = "--load") -> None:
    """Copy the checkpoint folder ``path`` into ``model`` (this rank's TP shard and experts) and, when
    ``want_optim`` and it holds Adam state, into ``optimizer``. Shapes are checked; a mismatch or a missing
    tensor is a UserError naming the file."""
    new_state = _read(path, model, ps, want_optim and optimizer is not None, flag)
    if new_state:
        install_state_by_param(optimizer, new_state)


def _read(path: str, model, ps, want_optim: bool, flag: str) -> dict:
    """The model filled in; the Adam state by parameter when ``want_optim`` (empty otherwise)."""
    named = dict(model.named_parameters())
    dense = load_file(os.path.join(path, DENSE_MODEL_FILE), flag)
    optim_dense = load_file(os.path.join(path, DENSE_OPTIM_FILE), flag) if want_optim else {}
    new_state = {}
    with torch.no_grad():
        for n, p in named.items():
            if is_expert(p):
                continue
            if n not in dense:
                raise UserError(f"{flag}: parameter {n} is missing from {path}; the checkpoint does not match the model")
            if tuple(dense[n].shape) != full_shape(p):
                raise UserError(f"{flag}: {n} has shape {tuple(dense[n].shape)} in the checkpoint but {full_shape(p)} in "
                                f"the model; pass the flags it was trained with")
            local = (lambda t: shard_tp(t, p, ps)) if is_tp_sharded(p) else (lambda t: t)
            p.copy_(local(dense[n]))
            if n in optim_dense:
                st = optim_dense[n]
                for key in ("exp_avg", "exp_avg_sq"):
                    got = tuple(st[key].shape) if isinstance(st.get(key), torch.Tensor) else None
                    if got != full_shape(p):
                        raise UserError(f"{flag}: {os.path.join(path, DENSE_OPTIM_FILE)} holds Adam {key} of shape "
                                        f"{got} for {n}, whose shape is {full_shape(p)}: the file is damaged or from "
                                        f"another model; load with --no-load-optim to keep the weights only")
                new_state[p] = {"exp_avg": local(st["exp_avg"]), "exp_avg_sq": local(st["exp_avg_sq"]), "step": st["step"]}
        for layer, experts in expert_stacks(model):
            params = dict(experts.named_parameters(recurse=False))
            slices = {k: {"exp_avg": [], "exp_avg_sq": [], "step": None} for k in params}
            for i in range(experts.num_local):
                file = os.path.join(path, expert_file(layer, experts.first_expert + i))
                blob = load_file(file, flag)
                for k, p in params.items():
                    if k not in blob or tuple(blob[k].shape) != tuple(p[i].shape):
                        got = tuple(blob[k].shape) if k in blob else "nothing"
                        raise UserError(f"{flag}: {file} holds {got} for {k} but the model's expert has "
                                        f"{tuple(p[i].shape)}; pass the flags the checkpoint was trained with")
                    p[i].copy_(blob[k])
                    if f"optim.{k}.exp_avg" in blob:
                        for key in ("exp_avg", "exp_avg_sq"):
                            if tuple(blob[f"optim.{k}.{key}"].shape) != tuple(p[i].shape):
                                raise UserError(f"{flag}: {file} holds Adam {key} of shape "
                                                f"{tuple(blob[f'optim.{k}.{key}'].shape)} for {k}, whose shape is "
                                                f"{tuple(p[i].shape)}: the file is damaged or from another model; load "
                                                f"with --no-load-optim to keep the weights only")
                        slices[k]["exp_avg"].append(blob[f"optim.{k}.exp_avg"])
                        slices[k]["exp_avg_sq"].append(blob[f"optim.{k}.exp_avg_sq"])
                        slices[k]["step"] = float(blob[f"optim.{k}.step"])
            if want_optim:
                for k, p in params.items():
                    if len(slices[k]["exp_avg"]) == experts.num_local:
                        new_state[p] = {"exp_avg": torch.stack(slices[k]["exp_avg"]),
                                        "exp_avg_sq": torch.stack(slices[k]["exp_avg_sq"]), "step": slices[k]["step"]}
    return new_state


def describe_files(path: str) -> dict:
    """What the checkpoint folder ``path`` holds: ``files`` and ``expert_files`` (counts), ``bytes``,
    ``optimizer_state`` (whether Adam state was saved) and ``detail`` (one line for inspect)."""
    files = []
    for root, _, names in os.walk(path):
        for n in names:
            files.append((os.path.relpath(os.path.join(root, n), path), os.path.getsize(os.path.join(root, n))))
    experts = sum(1 for f, _ in files if f.startswith(EXPERTS_DIR + os.sep))
    return {"files": len(files), "expert_files": experts, "bytes": sum(s for _, s in files),
            "optimizer_state": any(f == DENSE_OPTIM_FILE for f, _ in files),
            "detail": f"format 1, full tensors: {experts} expert files"}
