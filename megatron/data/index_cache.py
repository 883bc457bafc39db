"""Index arrays cached on disk, memory-mapped on load, built by one rank.

A cache entry is a directory holding one ``<name>.npy`` per array. It is written under a temporary
name and renamed in one step, so a reader sees either the whole set or nothing; an entry that does
not load (truncated or corrupt file, missing array, inconsistent shapes) is rebuilt. Loaded arrays
are read-only ``np.memmap``: the pages live in the shared page cache, not in each process.

With torch.distributed initialised, global rank 0 builds (or loads) first while the other ranks wait
in a collective; then every other rank maps the files. A rank that still cannot load them (a cache
directory local to each node) lets the first rank of its node (``LOCAL_RANK`` 0) build in a second
round, and builds in memory itself as a last resort (a read-only directory). Every rank enters the
same two collectives whatever happens; an error in a build becomes the same one-line
:class:`UserError` on every rank instead of a hang.
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

import numpy as np
import torch.distributed as dist

from megatron.errors import UserError

builds = 0  # builds done by this process (tests count them)


def int_dtype(max_value: int):
    """int32 when every value up to ``max_value`` fits, else int64."""
    return np.dtype(np.int32) if int(max_value) <= np.iinfo(np.int32).max else np.dtype(np.int64)


def load(path: str, names, check: Callable[[dict], bool] | None = None) -> dict | None:
    """{name: read-only memmap} of the entry at ``path``, or None when it is missing or unusable."""
    try:
        arrays = {n: np.load(os.path.join(path, f"{n}.npy"), mmap_mode="r", allow_pickle=False) for n in names}
    except (OSError, ValueError, EOFError):
        return None
    if check is not None and not check(arrays):
        return None
    return arrays


def save(path: str, arrays: dict) -> bool:
    """Write the entry atomically (temporary directory + rename); False where the directory is not writable."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, a in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), a, allow_pickle=False)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)  # a stale or partial entry
        elif os.path.lexists(path):
            os.remove(path)
        os.rename(tmp, path)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return os.path.isdir(path)  # another process renamed its (identical) entry first


def load_or_build(path: str | None, names, build: Callable[[], dict], check=None) -> dict:
    """This process alone: load the entry, else build it, save it and map the saved files."""
    global builds
    if path:
        arrays = load(path, names, check)
        if arrays is not None:
            return arrays
    builds += 1
    arrays = build()
    if path and save(path, arrays):
        mapped = load(path, names, check)
        if mapped is not None:
            return mapped  # drop the in-memory copy
    if path:
        _warn_not_cached(os.path.dirname(path))
    return arrays  # read-only cache directory: keep the indices in memory


_warned: set = set()


def _warn_not_cached(directory: str) -> None:
    """Once per directory: the indices could not be cached there (read-only beside the data, say)."""
    if directory not in _warned:
        _warned.add(directory)
        print(f"WARNING: cannot write the dataset index cache in {directory}; the indices are kept in memory and "
              f"rebuilt at every start (pass --data-cache-path DIR, a writable directory, to cache them)",
              file=sys.stderr, flush=True)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: str | None, rank: int, world: int) -> None:
    """One collective over the default group: every rank raises the first rank's error, if any."""
    errors = [None] * world
    dist.all_gather_object(errors, None if error is None else f"rank {rank}: {error}")
    first = next((e for e in errors if e), None)
    if first:
        raise UserError(first)


def _try(path, names, build, check, what: str):
    try:
        return load_or_build(path, names, build, check), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - reported on every rank, see _agree
        return None, f"building {what} failed: {type(e).__name__}: {e}"


def cached(path: str | None, names, build: Callable[[], dict], check=None, what: str = "the index map") -> dict:
    """The arrays of ``build()``, cached at ``path`` (None: no cache, every process builds in memory).

    Every rank must call this with the same ``path`` in the same order (a collective when distributed).
    """
    rank, world = _distributed()
    if world == 1 or not path:
        return load_or_build(path, names, build, check)
    arrays, error = None, None
    if rank == 0:
        arrays, error = _try(path, names, build, check, what)
    _agree(error, rank, world)
    error = None
    if arrays is None:
        arrays = load(path, names, check)
        if arrays is None and int(os.environ.get("LOCAL_RANK", rank)) == 0:
            arrays, error = _try(path, names, build, check, what)  # node-local cache: first rank of the node
    _agree(error, rank, world)
    if arrays is None:
        arrays = load_or_build(path, names, build, check)
    return arrays
