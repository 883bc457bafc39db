"""Model families by name: adding one is its module plus one line in :data:`MODEL_FAMILIES`.

A family's class is built as ``cls(model_cfg, ep_rank=..., ep_size=...)`` (``model_cfg``: ModelConfig;
``ep_rank / ep_size``: which experts this rank holds) and offers ``init_weights(seed)`` (called by
``build_model`` on the already sharded model, after ``to_empty``: it fills each rank's shard in place,
layout-independently, see ``megatron.model.init_rng``) and the entry points of :class:`~megatron.model.gpt_model.GPTModel` (forward = training loss, distill,
logits, decode, new_cache).
"""
from __future__ import annotations

import torch

from megatron.errors import UserError
from megatron.model.gpt_model import GPTModel

MODEL_FAMILIES: dict[str, type[torch.nn.Module]] = {
    "gpt": GPTModel,
}


def build_family_model(family: str, model_cfg, ep_rank: int = 0, ep_size: int = 1) -> torch.nn.Module:
    """The bare (unsharded, uninitialised) module of ``family`` for ``model_cfg``, holding ``ep_rank``'s experts."""
    try:
        cls = MODEL_FAMILIES[family]
    except KeyError:
        raise UserError(f"unknown model family {family!r}; known: {', '.join(sorted(MODEL_FAMILIES))}") from None
    return cls(model_cfg, ep_rank=ep_rank, ep_size=ep_size)
