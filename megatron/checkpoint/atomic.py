"""Publishing checkpoints atomically, so that a process killed at any moment leaves a loadable one.

A save is written whole into its staging folder (``.iter_0000100.tmp``) and only then renamed to
``iter_0000100``; the tracker is rewritten after that, through a temporary file renamed over it. Re-saving
an iteration that exists swaps the new copy in with one atomic exchange (``renameat2(RENAME_EXCHANGE)``
on Linux); elsewhere the previous copy is renamed to ``.iter_0000100.old`` first, and a crash between
those two renames is repaired by :func:`recover_and_clean` at the next start. So at every instant the
tracker names a complete checkpoint.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil

from megatron.checkpoint.layout import TRACKER, iter_dir_name, previous_dir, read_tracker, staging_dir
from megatron.errors import UserError


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old contents or the new, never a part."""
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tracker(save_dir: str, iteration: int) -> None:
    """Name ``iteration`` as the latest checkpoint of ``save_dir`` (call once it is published)."""
    atomic_write_text(os.path.join(save_dir, TRACKER), str(iteration))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(save_dir: str, iteration: int) -> str:
    """Make the complete staging folder of ``iteration`` its checkpoint folder without a moment where that
    folder is absent (or, without an atomic exchange, with its previous copy at the ``.old`` name for
    :func:`recover_and_clean`). Returns the checkpoint folder."""
    tmp, final = staging_dir(save_dir, iteration), os.path.join(save_dir, iter_dir_name(iteration))
    if not os.path.exists(final):
        os.replace(tmp, final)
        return final
    if _exchange(tmp, final):  # now tmp holds the previous copy
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    old = previous_dir(save_dir, iteration)
    if os.path.exists(old):
        shutil.rmtree(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


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
        final, old = os.path.join(save_dir, iter_dir_name(iteration)), previous_dir(save_dir, iteration)
        if not os.path.isdir(final) and os.path.isdir(old):
            os.replace(old, final)
            lines.append(f"> restored {final} from {old} (a re-save was interrupted between its two renames)")
    orphans = (glob.glob(os.path.join(save_dir, ".iter_*.tmp")) + glob.glob(os.path.join(save_dir, ".iter_*.old"))
               + [p for p in glob.glob(os.path.join(save_dir, TRACKER + ".tmp*"))  # only the names written here
                  if re.fullmatch(re.escape(TRACKER) + r"\.tmp\d+", os.path.basename(p))])
    for path in sorted(orphans):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
        lines.append(f"> removed {path}, left by an interrupted save")
    return lines
