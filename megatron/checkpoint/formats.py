"""The registry of checkpoint formats, keyed by the ``format`` field every ``common.pt`` stores.

:func:`save_checkpoint` and :func:`write_weights_checkpoint` write :data:`SAVED_FORMAT`; a load reads
``format`` from ``common.pt`` and hands the folder to the module registered for it in :data:`FORMATS`:

- 1, ``--ckpt-format torch`` (``full_tensor_format``): full tensors gathered to one writer, one file per
  expert. A checkpoint whose ``common.pt`` has no ``format`` field is format 1, the only layout written
  before format 2.
- 2, ``--ckpt-format torch_dist``, the default (``sharded_format``): every rank writes its own shard
  through ``torch.distributed.checkpoint``; loads reshard to any layout.

To add a format: write one module beside these that provides the :class:`CheckpointFormat` names and
add one line to :data:`FORMATS` and :data:`FORMAT_NAMES`.
The tracker, ``common.pt``, the RNG files and the atomic publish (``layout``, ``atomic``) are shared by
every format; a format owns only the model and optimizer files inside the checkpoint folder.
"""
from __future__ import annotations

from typing import Protocol

from megatron.checkpoint import full_tensor_format, sharded_format
from megatron.errors import UserError


class CheckpointFormat(Protocol):
    """What a format module provides (see ``full_tensor_format`` for the contract of each)."""

    VERSION: int

    def write(self, folder: str, model, optimizer, ps, save_optim: bool) -> None: ...

    def write_weights(self, folder: str, model) -> None: ...

    def read(self, path: str, model, optimizer, ps, want_optim: bool, flag: str = "--load") -> None: ...

    def describe_files(self, path: str) -> dict: ...  # files, bytes, optimizer_state, detail (and more)


FORMATS: dict[int, CheckpointFormat] = {
    full_tensor_format.VERSION: full_tensor_format,
    sharded_format.VERSION: sharded_format,
}
FORMAT_NAMES: dict[str, CheckpointFormat] = {  # --ckpt-format (Megatron-LM's names)
    "torch": full_tensor_format,
    "torch_dist": sharded_format,
}
SAVED_FORMAT: CheckpointFormat = sharded_format  # the format new checkpoints are written in by default


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
