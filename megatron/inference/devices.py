"""``--device`` of the tools that run a checkpoint (generate, evaluate, serve): checked before the model loads."""
from __future__ import annotations

import torch

from megatron.errors import UserError


def check_device(device):
    """``--device``: a torch device name whose accelerator is present (else one line, not a CUDA traceback)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or leave it out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return device
