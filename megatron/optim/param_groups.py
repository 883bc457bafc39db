"""Megatron's parameter groups: no weight decay on biases and norms; experts in groups of their own."""
from __future__ import annotations

import torch

from megatron.model.param_tags import is_expert


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim == 1 or leaf in ("bias", "b1", "b2") or "layernorm" in name or "norm" in leaf


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (is_expert(p), no_weight_decay(name, p))
        groups.setdefault(key, []).append(p)
    out = []
    for (expert, nwd), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if nwd else weight_decay,
                    "name": f"{'expert' if expert else 'dense'}_{'no_decay' if nwd else 'decay'}"})
    return out

