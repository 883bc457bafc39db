"""The two refusals around a checkpoint: non-finite weights before a save, another architecture at a load.

:func:`check_finite` runs on every rank before anything is written, so a NaN anywhere stops the save
everywhere and the tracker keeps naming the last finite checkpoint. :func:`check_architecture` compares
the stored model config with the one the flags give and names each difference and the flag to pass.
"""
from __future__ import annotations

import torch

from megatron.config.schema import ModelConfig
from megatron.errors import TrainingFault, UserError
from megatron.parallel.collectives import any_rank


def check_finite(model, ps, iteration: int) -> None:
    """Every parameter finite on every rank, or a TrainingFault on every rank (before anything is written)."""
    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
    if any_rank(bad is not None, ps):
        where = f" ({bad} on rank {ps.rank})" if bad else ""
        raise TrainingFault(f"iteration {iteration}: the weights hold NaN or infinity{where}; no checkpoint was "
                            f"written and the tracker still names the last finite one")


def check_architecture(stored_model_cfg: dict, model_cfg, what: str = "--load") -> None:
    """A UserError unless the stored model config (a dict) describes the same network as ``model_cfg``."""
    stored = ModelConfig.from_dict(stored_model_cfg)
    if stored.moe.enabled and model_cfg.moe.enabled and stored.moe.router_type != model_cfg.moe.router_type:
        raise UserError(f"{what}: the checkpoint was trained with --moe-router-type {stored.moe.router_type} but the "
                        f"flags say --moe-router-type {model_cfg.moe.router_type} (the routers hold different state); "
                        f"pass --moe-router-type {stored.moe.router_type}")
    a, b = stored.architecture(), model_cfg.architecture()
    diffs = [f"{k}: checkpoint {a[k]} vs flags {b[k]}" for k in b if a.get(k) != b[k]]
    if diffs:
        raise UserError(f"{what}: the checkpoint's architecture differs from the flags ({'; '.join(diffs)}); "
                        f"pass the flags it was trained with")
    if stored.true_vocab_size is not None and model_cfg.true_vocab_size != stored.true_vocab_size:
        raise UserError(f"{what}: the checkpoint masks its padded vocabulary with --true-vocab-size "
                        f"{stored.true_vocab_size} but the flags give {model_cfg.true_vocab_size or 'none'}; pass "
                        f"--true-vocab-size {stored.true_vocab_size} (its padding rows would otherwise take probability)")
