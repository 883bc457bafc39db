"""Saving a training checkpoint: model, optimizer, scheduler, loss scaler, config and RNG states.

Every rank calls :func:`save_checkpoint`. Nothing is written unless every parameter is finite on every
rank. The checkpoint is written into its staging folder in the format ``megatron.checkpoint.formats``
names for saving, with ``common.pt`` (iteration, config, scheduler, loss scaler, the caller's extras
and ``format``) from the main rank and one RNG file per rank, then published atomically, and only then
named by the tracker; a process killed at any moment leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import os
import shutil

from megatron.checkpoint.atomic import publish, write_tracker
from megatron.checkpoint.checks import check_finite
from megatron.checkpoint.file_io import save_file
from megatron.checkpoint.formats import SAVED_FORMAT
from megatron.checkpoint.layout import COMMON_FILE, iter_dir_name, rng_file, staging_dir
from megatron.checkpoint.optimizer_state import state_by_param
from megatron.checkpoint.rng import rng_state


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, scaler, cfg, ps, extra: dict,
                    save_optim: bool = True) -> str:
    """Save iteration ``iteration`` into ``save_dir`` (collective: every rank calls it); ``extra`` is merged
    into ``common.pt`` (consumed samples, ...). Returns the checkpoint folder."""
    check_finite(model, ps, iteration)
    tmp = staging_dir(save_dir, iteration)
    if ps.is_main:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    ps.barrier()
    opt_state = state_by_param(optimizer) if save_optim else {}
    SAVED_FORMAT.write(tmp, model, opt_state, ps, save_optim)
    if ps.is_main:
        common = {"format": SAVED_FORMAT.VERSION, "iteration": iteration, "config": cfg.to_dict(),
                  "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **extra}
        save_file(common, os.path.join(tmp, COMMON_FILE))
    save_file(rng_state(), os.path.join(tmp, rng_file(ps.rank)))
    ps.barrier()
    if ps.is_main:
        publish(save_dir, iteration)
        write_tracker(save_dir, iteration)
    ps.barrier()
    return os.path.join(save_dir, iter_dir_name(iteration))
