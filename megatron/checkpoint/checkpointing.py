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
any moment leaves the previous checkpoint loadable. Re-saving an iteration that exists swaps the
new copy in with one atomic exchange (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two
renames, and a crash between them is repaired by :func:`recover_and_clean` on the next start), so
the tracker always names a complete checkpoint. Nothing is written unless every parameter is
finite. Loads use ``torch.load(weights_only=True)``; a file holding other pickled objects is
refused as unsafe.
"""
from __future__ import annotations

import ctypes
import glob
import os
import random
import shutil

import numpy as np
import torch

from megatron.config.schema import ModelConfig
from megatron.errors import TrainingFault, UserError
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_expert, is_tp_sharded
from megatron.parallel.collectives import any_rank
from megatron.parallel.tensor_parallel import full_shape, gather_tp, shard_tp

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
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"{flag}: {path} was refused as unsafe: it holds pickled objects other than tensors and "
                            f"plain containers, which could run code when loaded; use a checkpoint from a trusted "
                            f"source") from None
        # corrupt file
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
    return [(m.layer_number, m.experts) for m in model.modules() if isinstance(m, MoELayer)]


def _optimizer_state_by_param(optimizer):
    """Per-parameter Adam state; the ZeRO-1 optimizer all-gathers its shards (collective)."""
    if hasattr(optimizer, "state_by_param"):
        return optimizer.state_by_param()
    return {p: optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]}


def _full(t: torch.Tensor, p, ps) -> torch.Tensor:
    """The full (TP-gathered) CPU tensor of parameter p's local tensor t (collective over TP if sharded)."""
    return (gather_tp(t, p, ps) if is_tp_sharded(p) else t).detach().cpu()


def _tmp_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, "." + iter_dir_name(iteration) + ".tmp")


def _old_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, "." + iter_dir_name(iteration) + ".old")


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: str, final: str, old: str) -> None:
    """Make the complete directory ``tmp`` the checkpoint ``final`` without a moment where ``final`` is absent
    (or, without an atomic exchange, with its previous copy at ``old`` for :func:`recover_and_clean`)."""
    if not os.path.exists(final):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # now tmp holds the previous copy
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if os.path.exists(old):
        shutil.rmtree(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_and_clean(save_dir: str) -> list[str]:
    """On start-up (main rank): restore a checkpoint a crash left at its ``.old`` name, then delete the
    orphans of killed saves (``.iter_*.tmp``, ``.iter_*.old``, tracker temp files). Returns log lines."""
    lines = []
    if not os.path.isdir(save_dir):
        return lines
    try:
        iteration = read_tracker(save_dir, "--save")
    except UserError:
        iteration = None
    if iteration:
        final, old = os.path.join(save_dir, iter_dir_name(iteration)), _old_dir(save_dir, iteration)
        if not os.path.isdir(final) and os.path.isdir(old):
            os.replace(old, final)
            lines.append(f"> restored {final} from {old} (a re-save was interrupted between its two renames)")
    orphans = (glob.glob(os.path.join(save_dir, ".iter_*.tmp")) + glob.glob(os.path.join(save_dir, ".iter_*.old"))
               + glob.glob(os.path.join(save_dir, TRACKER + ".tmp*")))
    for path in sorted(orphans):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        lines.append(f"> removed {path}, left by an interrupted save")
    return lines


def check_finite(model, ps, iteration: int) -> None:
    """Every parameter finite on every rank, or a TrainingFault on every rank (before anything is written)."""
    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
    if any_rank(bad is not None, ps):
        where = f" ({bad} on rank {ps.rank})" if bad else ""
        raise TrainingFault(f"iteration {iteration}: the weights hold NaN or infinity{where}; no checkpoint was "
                            f"written and the tracker still names the last finite one")


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, scaler, cfg, ps, extra: dict,
                    save_optim: bool = True) -> str:
    check_finite(model, ps, iteration)
    final = os.path.join(save_dir, iter_dir_name(iteration))
    tmp = _tmp_dir(save_dir, iteration)
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
        _publish(tmp, final, _old_dir(save_dir, iteration))
        _atomic_write_text(os.path.join(save_dir, TRACKER), str(iteration))
    ps.barrier()
    return final


def read_tracker(load_dir: str, flag: str = "--load"):
    path = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise UserError(f"{flag}: {path} is not UTF-8 text (it should hold an iteration number); fix or delete "
                        f"the file") from None
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag}: {path} holds {text!r}, not an iteration number; fix or delete the file") from None


def check_architecture(stored_model_cfg: dict, model_cfg, what: str = "--load") -> None:
    stored = ModelConfig.from_dict(stored_model_cfg)
    if stored.moe.enabled and model_cfg.moe.enabled and stored.moe.router_type != model_cfg.moe.router_type:
        raise UserError(f"{what}: the checkpoint was trained with --moe-router-type {stored.moe.router_type} but the "
                        f"flags say --moe-router-type {model_cfg.moe.router_type} (the routers hold different state); "
                        f"pass --moe-router-type {stored.moe.router_type}")
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
        hint = f"; its previous copy is at {_old_dir(load_dir, iteration)}: rename it back" \
            if os.path.isdir(_old_dir(load_dir, iteration)) else ""
        raise UserError(f"{flag}: {TRACKER} names iteration {iteration} but {path} is missing{hint}")
    common_file = os.path.join(path, "common.pt")
    common = _load(common_file, flag)
    if not (isinstance(common, dict) and isinstance(common.get("config"), dict) and "iteration" in common
            and isinstance(common["config"].get("model"), dict)):
        raise UserError(f"{flag}: {common_file} is not a checkpoint of this framework (no stored config and "
                        f"iteration); convert it first or point {flag} at a checkpoint saved by pretrain_gpt_moe.py")
    return path, common


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
                file = os.path.join(path, expert_file(layer, experts.first_expert + i))
                blob = _load(file, flag)
                for k, p in params.items():
                    if k not in blob or tuple(blob[k].shape) != tuple(p[i].shape):
                        got = tuple(blob[k].shape) if k in blob else "nothing"
                        raise UserError(f"{flag}: {file} holds {got} for {k} but the model's expert has "
                                        f"{tuple(p[i].shape)}; pass the flags the checkpoint was trained with")
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
