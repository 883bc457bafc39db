"""Loading a checkpoint into a model (and, for a resume, its optimizer, scheduler, loss scaler and RNG).

:func:`load_checkpoint` finds the latest checkpoint through the tracker, refuses a format this version
does not know and an architecture other than the flags', then lets the checkpoint's format (looked up
in ``megatron.checkpoint.formats`` by the ``format`` field of ``common.pt``) fill this rank's part of
the model and collect the optimizer state; scheduler, loss scaler and RNG come from the shared files.
Every file is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os

from megatron.checkpoint.checks import check_architecture
from megatron.checkpoint.file_io import load_file
from megatron.checkpoint.formats import format_of
from megatron.checkpoint.layout import COMMON_FILE, locate_checkpoint, rng_file
from megatron.checkpoint.rng import set_rng_state


def load_checkpoint(load_dir: str, model, optimizer, scheduler, scaler, cfg, ps, load_optim=True, load_rng=True,
                    strict_arch=True, flag: str = "--load"):
    """Returns the checkpoint's common dict (iteration, consumed samples, ...) or None if there is none.

    ``cfg`` needs only ``.model`` (the architecture to check) when optimizer, scheduler and scaler are None.
    """
    found = locate_checkpoint(load_dir, flag)
    if found is None:
        return None
    path, common = found
    fmt = format_of(common, os.path.join(path, COMMON_FILE), flag)
    if strict_arch:
        check_architecture(common["config"]["model"], cfg.model, flag)
    fmt.read(path, model, optimizer, ps, load_optim and optimizer is not None, flag)
    if scheduler is not None and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if scaler is not None and "scaler" in common:
        scaler.load_state_dict(common["scaler"])
    if load_rng:
        rng_path = os.path.join(path, rng_file(ps.rank))
        if os.path.isfile(rng_path):
            set_rng_state(load_file(rng_path, flag))
        elif ps.is_main:
            print(f"WARNING: no RNG state for rank {ps.rank} in {path} (saved with fewer ranks); RNG not restored",
                  flush=True)
    return common
