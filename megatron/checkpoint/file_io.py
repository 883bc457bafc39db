"""Writing one checkpoint file, and reading one back safely.

Every checkpoint file is a ``torch.save`` of tensors and plain containers. Reads use
``torch.load(weights_only=True)``, so a file holding any other pickled object is refused as unsafe
instead of being unpickled; a missing, refused or unreadable file is a one-line ``UserError`` naming
the file and the flag that pointed at it.
"""
from __future__ import annotations

import os

import torch

from megatron.errors import UserError


def save_file(obj, path: str) -> None:
    """``torch.save(obj, path)``, creating the file's folder first; a failed write (a full disk, the file-size
    limit) is a one-line UserError naming the file (the save is in its staging folder: nothing published)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, path)
    except (OSError, RuntimeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--save: writing {path} failed ({type(e).__name__}: {text[:200]}); the previous checkpoint "
                        f"is intact: free space or fix the folder and save again") from None


def load_file(path: str, flag: str = "--load"):
    """The contents of the checkpoint file ``path`` on the CPU; ``flag`` names the option in error messages."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{flag}: checkpoint file {path} is missing; the checkpoint is incomplete") from None
    except Exception as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"{flag}: {path} was refused as unsafe: it holds pickled objects other than tensors and "
                            f"plain containers, which could run code when loaded; use a checkpoint from a trusted "
                            f"source") from None
        # corrupt file
        raise UserError(f"{flag}: cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt") from None
