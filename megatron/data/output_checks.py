"""Checks of the output of tools/preprocess_data.py and tools/merge_datasets.py: the prefix names a file stem, and a
write that fails (a read-only or full destination, ``ulimit -f``) is one line, with this process's temp files removed
and any dataset already at the prefix left as it was (the builder renames its files into place only when complete)."""
from __future__ import annotations

import os

from megatron.data.indexed_dataset import data_path, index_path
from megatron.errors import UserError


def check_output_prefix(prefix: str, files: str = "NAME_<key>_document.bin/.idx") -> None:
    """``DIR/`` (or ``DIR/.``) would write files named ``_text_document`` (``.bin``) inside the directory."""
    if os.path.basename(prefix) in ("", ".", ".."):
        raise UserError(f"--output-prefix {prefix!r} names a directory, not a file stem: give DIR/NAME (the files "
                        f"are {files})")


def write_failed(prefix: str, e: OSError) -> UserError:
    """The one-line error of a failed write; nothing at ``prefix`` was replaced."""
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"--output-prefix {prefix}: writing {e.filename or 'the output'} failed ({reason}); nothing "
                     f"was replaced and any dataset already there is intact: free space or choose a writable directory")


def remove_temp_files(prefixes) -> None:
    """This process's temp files (``PREFIX.bin.tmpPID``, ``PREFIX.idx.tmpPID``) that an interrupted write leaves."""
    for prefix in prefixes:
        for path in (data_path(prefix), index_path(prefix)):
            try:
                os.remove(f"{path}.tmp{os.getpid()}")
            except OSError:
                pass
