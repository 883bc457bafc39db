"""One model provider: the GPT model of this rank, built, placed and parallelised.

``build_model`` is the single place that constructs a model for a run: this rank's experts
(``ep_rank``'s share of each MoE layer), tensor-parallel shards and the expert-parallel dispatch.
With a ``seed`` the weights are initialised (training from scratch); without one the model is
built on the meta device and given uninitialised storage, for weights that come from a checkpoint.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.parallel.expert_parallel import apply_expert_parallel
from megatron.parallel.tensor_parallel import apply_tensor_parallel


def gpt_module(model_cfg, ps) -> torch.nn.Module:
    from megatron.model.gpt_model import GPTModel

    return GPTModel(model_cfg, ep_rank=ps.ep_rank, ep_size=ps.ep_size)


def build_model(model_cfg, ps, device: Optional[torch.device] = None, seed: Optional[int] = None,
                module_fn: Optional[Callable[[], torch.nn.Module]] = None) -> torch.nn.Module:
    """The model on ``device`` (default ``ps.device``), TP-sharded and expert-parallel.

    ``module_fn()`` builds the bare module (default: the GPT model of ``model_cfg``); a training
    script's ``model_provider`` hook plugs in here.
    """
    module_fn = module_fn or (lambda: gpt_module(model_cfg, ps))
    device = device or ps.device
    if seed is None:
        with torch.device("meta"):
            model = module_fn()
        model = model.to_empty(device=device)
    else:
        model = module_fn()
        model.init_weights(seed)
        model.to(device)
    apply_tensor_parallel(model, ps)
    apply_expert_parallel(model, ps)
    return model
