"""A checkpoint's stored config (its ``common.pt``): reading it without loading weights, and writing a
copy of a checkpoint with it changed.

:func:`read_checkpoint_config` is what tools call to look at a checkpoint (inspect, upcycle, the
evaluation harness) before, or instead of, building its model. :func:`copy_checkpoint` serves the
offline reshard: the tensors are copied unchanged and only ``common.pt`` is rewritten.
"""
from __future__ import annotations

import os
import shutil

import torch

from megatron.checkpoint.atomic import write_tracker
from megatron.checkpoint.layout import COMMON_FILE, TRACKER, iter_dir_name, locate_checkpoint
from megatron.errors import UserError


def read_checkpoint_config(load_dir: str, flag: str = "--load") -> tuple[str, dict]:
    """(iteration directory, common dict) of the latest checkpoint in ``load_dir``; a UserError if there is none."""
    found = locate_checkpoint(load_dir, flag)
    if found is None:
        raise UserError(f"{flag} {load_dir}: no checkpoint there ({TRACKER} is missing)")
    return found


def copy_checkpoint(path: str, common: dict, save_dir: str) -> str:
    """Copy the checkpoint folder ``path`` into ``save_dir`` (new or empty) as its latest checkpoint, with
    ``common`` (the checkpoint's common dict, edited) as its ``common.pt``. Returns the new folder."""
    iteration = int(common["iteration"])
    final = os.path.join(save_dir, iter_dir_name(iteration))
    shutil.copytree(path, final)
    common_path = os.path.join(final, COMMON_FILE)
    torch.save(common, common_path + ".tmp")
    os.replace(common_path + ".tmp", common_path)
    write_tracker(save_dir, common["iteration"])
    return final
