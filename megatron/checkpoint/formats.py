"""The registry of checkpoint formats, keyed by the ``format`` field every ``common.pt`` stores.

:func:`save_checkpoint` and :func:`write_weights_checkpoint` write :data:`SAVED_FORMAT`; a load reads
``format`` from ``common.pt`` and hands the folder to the module registered for it in :data:`FORMATS`.
Today there is one format, 1 (``full_tensor_format``: full tensors, one file per expert). A checkpoint
whose ``common.pt`` has no ``format`` field is read as format 1, the only layout ever written.

To add a format (say a sharded ``torch.distributed.checkpoint`` one): write one module beside
``full_tensor_format.py`` that provides the :class:`CheckpointFormat` names, add one line to
:data:`FORMATS`, and point :data:`SAVED_FORMAT` at it once new checkpoints should be written that way.
The tracker, ``common.pt``, the RNG files and the atomic publish (``layout``, ``atomic``) are shared by
every format; a format owns only the model and optimizer files inside the checkpoint folder.
"""
from __future__ import annotations

from typing import Protocol

from megatron.checkpoint import full_tensor_format
from megatron.errors import UserError


class CheckpointFormat(Protocol):
    """What a format module provides (see ``full_tensor_format`` for the contract of each)."""

    VERSION: int

    def write(self, folder: str, model, opt_state: dict, ps, save_optim: bool) -> None: ...

    def write_weights(self, folder: str, model) -> None: ...

    def read(self, path: str, model, ps, want_optim: bool, flag: str = "--load") -> dict: ...

    def describe_files(self, path: str) -> dict: ...


FORMATS: dict[int, CheckpointFormat] = {
    full_tensor_format.VERSION: full_tensor_format,
}
SAVED_FORMAT: CheckpointFormat = full_tensor_format  # the format new checkpoints are written in


def format_of(common: dict, common_file: str, flag: str = "--load") -> CheckpointFormat:
    """The format module for a checkpoint whose ``common.pt`` (at ``common_file``) holds ``common``; a one-line
    UserError naming the file and its ``format`` field when this version does not know that format."""
    version = common.get("format", full_tensor_format.VERSION)
    fmt = FORMATS.get(version) if type(version) is int else None
    if fmt is None:
        known = ", ".join(str(v) for v in sorted(FORMATS))
        raise UserError(f"{flag}: {common_file} has format {version!r} (its 'format' field), which this version cannot "
                        f"read (it reads format {known}); load it with the version of megatron-moe that saved it")
    return fmt
