"""Checkpoints: Megatron-like layout, atomic saves, safe loads, experts keyed by global id.

Layout::

    <dir>/latest_checkpointed_iteration.txt        written last (tmp + rename)
    <dir>/iter_0000100/
        common.pt                 iteration, consumed samples, config, scheduler, loss scaler
        model_dense.pt            every non-expert parameter, by name
        optim_dense.pt            Adam state of the non-expert parameters, by name
        experts/layer_{L}_expert_{G}.pt   one expert (MoE layer index L, global expert id G):
                                  weights and Adam state, so any EP / DP layout can load it
        rng/rank_{r}.pt           python / numpy / torch RNG states of rank r

A save goes to ``.iter_0000100.tmp`` first and is renamed when complete, so a process killed at
any moment leaves the previous checkpoint loadable. Loads use ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from megatron.errors import UserError
from megatron.parallel.param_tags import is_expert
from megatron.parallel.tensor_parallel import full_shape, gather_tp, is_tp_sharded, shard_tp

TRACKER = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def expert_file(layer: int, expert: int) -> str:
    return os.path.join("experts", f"layer_{layer:03d}_expert_{expert:04d}.pt")


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(obj, path)


def _load(path: str, flag: str = "--load"):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{flag}: checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # corrupt file
        raise UserError(f"{flag}: cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt") from None


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _expert_modules(model):
    """(MoE layer index, StackedExperts module) for every MoE layer."""
    from megatron.model.moe.layer import MoELayer

    return [(m.layer_number, m.experts) for m in model.modules() if isinstance(m, MoELayer)]


def _optimizer_state_by_param(optimizer):
    """Per-parameter Adam state; the ZeRO-1 optimizer all-gathers its shards (collective)."""
    if hasattr(optimizer, "state_by_param"):
        return optimizer.state_by_param()
    return {p: optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]}


def _full(t: torch.Tensor, p, ps) -> torch.Tensor:
    """The full (TP-gathered) CPU tensor of parameter p's local tensor t (collective over TP if sharded)."""
    return (gather_tp(t, p, ps) if is_tp_sharded(p) else t).detach().cpu()


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, scaler, cfg, ps, extra: dict,
                    save_optim: bool = True) -> str:
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = os.path.join(save_dir, "." + iter_dir_name(iteration) + ".tmp")
    if ps.is_main:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    ps.barrier()
    opt_state = _optimizer_state_by_param(optimizer) if save_optim else {}
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
        _save(dense, os.path.join(tmp, "model_dense.pt"))
        if save_optim:
            _save(optim, os.path.join(tmp, "optim_dense.pt"))
        common = {"format": FORMAT_VERSION, "iteration": iteration, "config": cfg.to_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **extra}
        _save(common, os.path.join(tmp, "common.pt"))
    if ps.edp_rank == 0 and ps.tp_rank == 0:  # one replica of each expert writes it
        for layer, experts in _expert_modules(model):
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
                _save(blob, os.path.join(tmp, expert_file(layer, g)))
    _save(rng_state(), os.path.join(tmp, "rng", f"rank_{ps.rank:05d}.pt"))
    ps.barrier()
    if ps.is_main:
        old = None
        if os.path.exists(final):
            old = final + f".old{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(save_dir, TRACKER), str(iteration))
        if old:
            shutil.rmtree(old, ignore_errors=True)
    ps.barrier()
    return final


def read_tracker(load_dir: str, flag: str = "--load"):
    path = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {path} holds {text!r}, not an iteration number; fix or delete the file") from None


def check_architecture(stored_model_cfg: dict, model_cfg, what: str = "--load") -> None:
    from megatron.config import ModelConfig

    stored = ModelConfig.from_dict(stored_model_cfg)
    a, b = stored.architecture(), model_cfg.architecture()
    diffs = [f"{k}: checkpoint {a[k]} vs flags {b[k]}" for k in b if a.get(k) != b[k]]
    if diffs:
        raise UserError(f"{what}: the checkpoint's architecture differs from the flags ({'; '.join(diffs)}); "
                        f"pass the flags it was trained with")


def locate_checkpoint(load_dir: str, flag: str = "--load"):
    """(iteration directory, common dict) of the latest checkpoint in ``load_dir``, or None if there is none."""
    if not os.path.isdir(load_dir):
        raise UserError(f"{flag} {load_dir}: no such directory")
    iteration = read_tracker(load_dir, flag)
    if iteration is None:
        return None
    path = os.path.join(load_dir, iter_dir_name(iteration))
    if not os.path.isdir(path):
        raise UserError(f"{flag}: {TRACKER} names iteration {iteration} but {path} is missing")
    return path, _load(os.path.join(path, "common.pt"), flag)


def load_checkpoint(load_dir: str, model, optimizer, scheduler, scaler, cfg, ps, load_optim=True, load_rng=True,
                    strict_arch=True, flag: str = "--load"):
    """Returns the checkpoint's common dict (iteration, consumed samples, ...) or None if there is none.

    ``cfg`` needs only ``.model`` (the architecture to check) when optimizer, scheduler and scaler are None.
    """
    found = locate_checkpoint(load_dir, flag)
    if found is None:
        return None
    path, common = found
    if strict_arch:
        check_architecture(common["config"]["model"], cfg.model, flag)
    named = dict(model.named_parameters())
    dense = _load(os.path.join(path, "model_dense.pt"), flag)
    optim_dense = _load(os.path.join(path, "optim_dense.pt"), flag) if load_optim and optimizer is not None else {}
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
                new_state[p] = {"exp_avg": local(st["exp_avg"]), "exp_avg_sq": local(st["exp_avg_sq"]), "step": st["step"]}
        for layer, experts in _expert_modules(model):
            params = dict(experts.named_parameters(recurse=False))
            slices = {k: {"exp_avg": [], "exp_avg_sq": [], "step": None} for k in params}
            for i in range(experts.num_local):
                blob = _load(os.path.join(path, expert_file(layer, experts.first_expert + i)), flag)
                for k, p in params.items():
                    p[i].copy_(blob[k])
                    if f"optim.{k}.exp_avg" in blob:
                        slices[k]["exp_avg"].append(blob[f"optim.{k}.exp_avg"])
                        slices[k]["exp_avg_sq"].append(blob[f"optim.{k}.exp_avg_sq"])
                        slices[k]["step"] = float(blob[f"optim.{k}.step"])
            if load_optim and optimizer is not None:
                for k, p in params.items():
                    if len(slices[k]["exp_avg"]) == experts.num_local:
                        new_state[p] = {"exp_avg": torch.stack(slices[k]["exp_avg"]),
                                        "exp_avg_sq": torch.stack(slices[k]["exp_avg_sq"]), "step": slices[k]["step"]}
    if load_optim and optimizer is not None and new_state:
        _install_optimizer_state(optimizer, new_state)
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if scaler is not None and "scaler" in common:
        scaler.load_state_dict(common["scaler"])
    if load_rng:
        rng_path = os.path.join(path, "rng", f"rank_{ps.rank:05d}.pt")
        if os.path.isfile(rng_path):
            set_rng_state(_load(rng_path, flag))
        elif ps.is_main:
            print(f"WARNING: no RNG state for rank {ps.rank} in {path} (saved with fewer ranks); RNG not restored",
                  flush=True)
    return common


def _install_optimizer_state(optimizer, state_by_param: dict) -> None:
    """Build a torch optimizer state_dict from per-parameter tensors and load it (torch places 'step')."""
    if hasattr(optimizer, "load_state_by_param"):  # ZeRO-1: keep this rank's shard
        optimizer.load_state_by_param(state_by_param)
        return
    sd = optimizer.state_dict()
    index = {}
    i = 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            index[p] = i
            i += 1
    state = {}
    for p, st in state_by_param.items():
        if p in index:
            state[index[p]] = {"step": torch.tensor(float(st["step"]), dtype=torch.float32),
                               "exp_avg": st["exp_avg"].to(p.device, p.dtype),
                               "exp_avg_sq": st["exp_avg_sq"].to(p.device, p.dtype)}
    sd["state"] = state
    optimizer.load_state_dict(sd)
