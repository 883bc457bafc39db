"""Where checkpoints live in a save directory, whatever their format, and how the latest one is found.

::

    <dir>/latest_checkpointed_iteration.txt   the tracker: the latest complete iteration, written last
    <dir>/iter_0000100/                        the checkpoint of iteration 100
        common.pt                              iteration, consumed samples, config, scheduler, loss scaler, and
                                               ``format``: how the model and optimizer files beside it are
                                               stored (``megatron.checkpoint.formats``)
        rng/rank_{r}.pt                        python / numpy / torch RNG states of rank r
    <dir>/.iter_0000100.tmp                    a save in progress, renamed to iter_0000100 when complete
    <dir>/.iter_0000100.old                    the previous copy, briefly, while a re-save swaps in without
                                               an atomic exchange (``megatron.checkpoint.atomic``)

A tracker holding ``release`` names iteration 0.
"""
from __future__ import annotations

import os
import re

from megatron.checkpoint.file_io import load_file
from megatron.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
COMMON_FILE = "common.pt"


def iter_dir_name(iteration: int) -> str:
    """The folder name of iteration ``iteration``'s checkpoint (``iter_0000100``)."""
    return f"iter_{iteration:07d}"


def staging_dir(save_dir: str, iteration: int) -> str:
    """Where a save of ``iteration`` is written before it is published under :func:`iter_dir_name`."""
    return os.path.join(save_dir, "." + iter_dir_name(iteration) + ".tmp")


def previous_dir(save_dir: str, iteration: int) -> str:
    """Where a re-save without an atomic exchange parks the previous copy of ``iteration`` for a moment."""
    return os.path.join(save_dir, "." + iter_dir_name(iteration) + ".old")


def rng_file(rank: int) -> str:
    """The RNG state file of global rank ``rank``, relative to the checkpoint folder."""
    return os.path.join("rng", f"rank_{rank:05d}.pt")


def read_tracker(load_dir: str, flag: str = "--load"):
    """The iteration the tracker of ``load_dir`` names, or None when there is no tracker."""
    path = os.path.join(load_dir, TRACKER)
    if not os.path.lexists(path):
        return None
    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "a broken symbolic link" if os.path.islink(path) else \
            "not a regular file"
        raise UserError(f"{flag}: {path} is {what}, not the tracker file (it should hold an iteration number); "
                        f"fix or remove it")
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


def locate_checkpoint(load_dir: str, flag: str = "--load"):
    """(iteration directory, common dict) of the latest checkpoint in ``load_dir``, or None if there is none."""
    if not os.path.isdir(load_dir):
        raise UserError(f"{flag} {load_dir}: no such directory")
    iteration = read_tracker(load_dir, flag)
    if iteration is None:
        return None
    path = os.path.join(load_dir, iter_dir_name(iteration))
    if not os.path.isdir(path):
        previous = previous_dir(load_dir, iteration)
        hint = f"; its previous copy is at {previous}: rename it back" if os.path.isdir(previous) else ""
        raise UserError(f"{flag}: {TRACKER} names iteration {iteration} but {path} is missing{hint}")
    common_file = os.path.join(path, COMMON_FILE)
    common = load_file(common_file, flag)
    if not (isinstance(common, dict) and isinstance(common.get("config"), dict) and "iteration" in common
            and isinstance(common["config"].get("model"), dict)):
        raise UserError(f"{flag}: {common_file} is not a checkpoint of this framework (no stored config and "
                        f"iteration); convert it first or point {flag} at a checkpoint saved by pretrain_gpt_moe.py")
    check_common(common, common_file, iteration, flag)
    return path, common


def check_common(common: dict, common_file: str, iteration: int, flag: str = "--load") -> None:
    """The counters of ``common.pt`` agree with its folder and make sense, or a one-line UserError naming the
    file and field."""
    it = common["iteration"]
    if type(it) is not int or it < 0:
        raise UserError(f"{flag}: {common_file} has iteration {it!r} (its 'iteration' field), not a count; the "
                        f"checkpoint is damaged: load an earlier one")
    if it != iteration and iteration != 0:  # a 'release' tracker names iteration 0 whatever the folder holds
        raise UserError(f"{flag}: {common_file} says iteration {it} (its 'iteration' field) but lies in the folder of "
                        f"iteration {iteration}; the checkpoint was moved or damaged: fix the tracker or the folder")
    for field in ("consumed_samples", "tokens_trained"):
        v = common.get(field)
        if v is not None and (type(v) is not int or v < 0):
            raise UserError(f"{flag}: {common_file} has {field} {v!r} (its '{field}' field), not a count >= 0; the "
                            f"checkpoint is damaged: load an earlier one")


def existing_iterations(save_dir: str) -> list[int]:
    """The iterations with a checkpoint folder (``iter_*``) in ``save_dir``, in order."""
    if not os.path.isdir(save_dir):
        return []
    out = []
    for name in os.listdir(save_dir):
        m = re.fullmatch(r"iter_(\d{7,})", name)
        if m and os.path.isdir(os.path.join(save_dir, name)):
            out.append(int(m.group(1)))
    return sorted(out)
