"""Saving a training checkpoint: model, optimizer, scheduler, loss scaler, config and RNG states.

Every rank calls :func:`save_checkpoint`. Nothing is written unless every parameter is finite on every
rank. The checkpoint is written into its staging folder in the format ``--ckpt-format`` names
(``megatron.checkpoint.formats``; by default the sharded format, every rank writing its own shard),
with ``common.pt`` (iteration, config, scheduler, loss scaler, the caller's extras and ``format``)
from the main rank and one RNG file per rank, then published atomically, and only then named by the
tracker; a process killed at any moment leaves the previous checkpoint loadable. With ``async_group``
(``--async-save``) the shards are written by a background thread (``megatron.checkpoint.async_save``)
and the call returns a :class:`~megatron.checkpoint.async_save.PendingSave` at once.
"""
from __future__ import annotations

import os
import shutil

from megatron.checkpoint.async_save import PendingSave
from megatron.checkpoint.atomic import publish, write_tracker
from megatron.checkpoint.checks import check_finite
from megatron.checkpoint.file_io import save_file
from megatron.checkpoint.formats import SAVED_FORMAT
from megatron.checkpoint.layout import COMMON_FILE, iter_dir_name, rng_file, staging_dir
from megatron.checkpoint.rng import rng_state
from megatron.errors import UserError
from megatron.parallel.collectives import agree_on_error


def save_checkpoint(save_dir: str, iteration: int, model, optimizer, scheduler, scaler, cfg, ps, extra: dict,
                    save_optim: bool = True, fmt=None, async_group=None, asynchronous: bool = False):
    """Save iteration ``iteration`` into ``save_dir`` (collective: every rank calls it); ``extra`` is merged
    into ``common.pt`` (consumed samples, ...); ``fmt``: a format module (default: the sharded format).
    Returns the checkpoint folder, or with ``asynchronous`` a PendingSave whose background thread writes
    the shards over ``async_group`` (a process group used for nothing else; None in a single process)."""
    fmt = fmt or SAVED_FORMAT
    if asynchronous and not hasattr(fmt, "state_for_save"):
        raise UserError("--async-save needs the sharded checkpoint format: drop --ckpt-format torch")
    check_finite(model, ps, iteration)
    tmp, final = staging_dir(save_dir, iteration), os.path.join(save_dir, iter_dir_name(iteration))
    if ps.is_main:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    ps.barrier()
    state = fmt.staged(fmt.state_for_save(model, optimizer, ps, save_optim)) if asynchronous else None
    error = None
    try:  # a failed write on any rank is one line on every rank, before anything is published
        if not asynchronous:
            fmt.write(tmp, model, optimizer, ps, save_optim)
        if ps.is_main:
            common = {"format": fmt.VERSION, "iteration": iteration, "config": cfg.to_dict(),
                      "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), **extra}
            save_file(common, os.path.join(tmp, COMMON_FILE))
        save_file(rng_state(), os.path.join(tmp, rng_file(ps.rank)))
    except UserError as e:
        error = f"{e} (rank {ps.rank})" if ps.distributed else str(e)
    agree_on_error(error, ps)
    if asynchronous:
        def write() -> None:
            fmt.write_state(tmp, state, ps, async_group)  # returns once every rank's shards and the index are written
            if ps.is_main:
                publish(save_dir, iteration)
                write_tracker(save_dir, iteration)
        return PendingSave(iteration, final, write)
    if ps.is_main:
        publish(save_dir, iteration)
        write_tracker(save_dir, iteration)
    ps.barrier()
    return final
