"""Checks before the first step, so that no compute is spent on a run that cannot finish.

* batch arithmetic: a ramp-up that moves (start, increment > 0, start <= the global batch);
* the save directory: created, proved writable by a test write, enough free space for one more
  checkpoint, and a per-process file-size limit (``ulimit -f``) above the largest checkpoint file;
* the training split is not empty.
Each failure is one line naming the flag (a :class:`UserError`).
"""
from __future__ import annotations

import os
import resource
import shutil

import torch

from megatron.checkpoint.layout import TRACKER, existing_iterations, read_tracker
from megatron.errors import UserError, check
from megatron.model.families import build_family_model
from megatron.model.param_tags import is_expert
from megatron.planning.model_stats import count_parameters

BYTES_PER_VALUE = 4  # checkpoints hold fp32 weights and fp32 Adam moments


SEED_LIMIT = 2**32  # numpy's RandomState (set_seed, the GPT index shuffle) takes seeds in [0, 2^32)


def check_seed(train_cfg) -> None:
    """``--seed`` fits every generator it seeds (2^70 was a numpy ``ValueError`` traceback at model build)."""
    seed = train_cfg.seed
    check(0 <= seed < SEED_LIMIT, f"--seed {seed}: must be an integer in [0, 2^32); choose a seed in that range")


def check_batch_arithmetic(train_cfg) -> None:
    """The ramp-up moves from a positive start to the global batch (its size >= 1 is an option check); the
    run's other numbers of the train section checked here at the very start too (``--seed``)."""
    check_seed(train_cfg)
    gbs = train_cfg.global_batch_size
    if train_cfg.rampup_batch_size is not None:
        start, incr, samples = train_cfg.rampup_batch_size
        check(start >= 1, f"--rampup-batch-size: the start batch size must be >= 1 (got {start})")
        check(incr >= 1, f"--rampup-batch-size: the increment must be >= 1 (got {incr}); a zero increment never "
                         f"reaches --global-batch-size")
        check(samples >= 0, f"--rampup-batch-size: the ramp-up samples must be >= 0 (got {samples})")
        check(gbs is None or start <= gbs,
              f"--rampup-batch-size: the start batch size {start} exceeds --global-batch-size {gbs}")


FRAMING_BYTES = 2048  # per stored tensor, one torch.save archive each (sharded format): about 1.6 KiB measured
DICT_FRAMING_BYTES = 512  # per tensor of a dict saved in one archive (optim_dense.pt): about 320 bytes measured
IMBALANCE = 1.1  # a sharded checkpoint's largest file over the average share (replicated pieces are spread by size)


def _tensor_counts(model_cfg) -> tuple[int, int]:
    """(parameter tensors, of which dense) of the model, from a build on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_family_model(model_cfg.model_family, model_cfg)
    params = list(model.parameters())
    return len(params), sum(1 for p in params if not is_expert(p))


def checkpoint_bytes(model_cfg, save_optim: bool, sharded_over: int | None = None) -> tuple[int, int]:
    """(whole checkpoint, largest file) in bytes, from the parameter counts the dry run prints, with the
    per-tensor framing. ``sharded_over``: the number of ranks writing a sharded (torch_dist) checkpoint, whose
    largest file is about the average share (times :data:`IMBALANCE`); None: the full-tensor format, whose
    largest file is optim_dense.pt (two moments of every dense parameter)."""
    counts = count_parameters(model_cfg)
    entries = 3 if save_optim else 1  # weights, and two Adam moments
    tensors, dense_tensors = _tensor_counts(model_cfg)
    total = counts.total * BYTES_PER_VALUE * entries + tensors * (entries + 1) * FRAMING_BYTES
    if sharded_over is not None:
        return total, int(total / max(1, sharded_over) * (IMBALANCE if sharded_over > 1 else 1.0))
    dense = counts.total - counts.expert
    return total, (dense * BYTES_PER_VALUE + dense_tensors * DICT_FRAMING_BYTES) * (2 if save_optim else 1)


def check_save_dir(save_dir: str, model_cfg, save_optim: bool, free_bytes=None, sharded_over: int | None = None) -> None:
    """Create ``--save``, prove it writable, and check space and the file-size limit (main rank)."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise UserError(f"--save {save_dir}: this is a file, not a directory; choose a directory")
    try:
        os.makedirs(save_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--save {save_dir}: cannot create the directory ({e.strerror}); choose a writable path") from None
    probe = os.path.join(save_dir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"--save {save_dir}: a test write failed ({e.strerror}); choose a writable directory "
                        f"with free space") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    total, largest = checkpoint_bytes(model_cfg, save_optim, sharded_over)
    free = shutil.disk_usage(save_dir).free if free_bytes is None else free_bytes
    if free < total:
        raise UserError(f"--save {save_dir}: {free / 2**30:.2f} GiB free but one checkpoint needs about "
                        f"{total / 2**30:.2f} GiB; free space or choose another directory")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < largest:
        raise UserError(f"--save {save_dir}: the file-size limit (ulimit -f) is {soft} bytes but the largest "
                        f"checkpoint file needs about {largest}; raise the limit (ulimit -f unlimited)")


def check_train_split(train_ds, data_cfg, train_iters: int, skip_train: bool) -> None:
    if train_ds is None and train_iters > 0 and not skip_train:
        raise UserError(f"--split {data_cfg.split!r} leaves no training documents in --data-path: give the "
                        f"train split a positive share (e.g. 98,2,0)")


def check_no_overwrite(save_dir: str, load_dir: str | None, overwrite: bool) -> None:
    """A run whose --save already holds checkpoints must resume from them (``--load`` the same directory, with its
    tracker) or say ``--overwrite-checkpoints``: forgetting --load on a restart would otherwise replace them."""
    existing = existing_iterations(save_dir)
    if not existing or overwrite:
        return
    shown = ", ".join(map(str, existing[:5])) + (", ..." if len(existing) > 5 else "")
    resumes = bool(load_dir) and os.path.realpath(load_dir) == os.path.realpath(save_dir)
    if load_dir and not resumes and not os.path.isdir(load_dir):
        return  # the load names its missing directory first, before anything is written
    if not resumes:
        raise UserError(f"--save {save_dir} already holds checkpoints (iterations {shown}) and this run does not "
                        f"resume from them: pass --load {save_dir} to resume, --overwrite-checkpoints to replace "
                        f"them, or choose another --save")
    if read_tracker(save_dir, "--save") is None:
        raise UserError(f"--save {save_dir} holds checkpoints (iterations {shown}) but no {TRACKER}, so --load would "
                        f"start from scratch and overwrite them: restore the tracker (echo {existing[-1]} > "
                        f"{os.path.join(save_dir, TRACKER)}) to resume, or pass --overwrite-checkpoints")
