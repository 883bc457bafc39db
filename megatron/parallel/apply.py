"""The whole parallel plan of a run, in order: build -> tensor parallel -> expert parallel -> data parallel.

``build_model`` is the single place that constructs a model for a run: this rank's experts
(``ep_rank``'s share of each MoE layer), then the tensor-parallel shards, then the expert-parallel
token dispatcher. With a ``seed`` the weights are initialised (training from scratch); without one
the model is built on the meta device and given uninitialised storage, for weights that come from a
checkpoint. ``build_grad_reducer`` is the data-parallel step of the plan (how gradients are summed
over DP and EDP); the sharded optimizers (ZeRO-1 / ZeRO-2) are chosen in ``megatron.optim.build``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.model.families import build_family_model
from megatron.parallel.expert_parallel import apply_expert_parallel
from megatron.parallel.grad_sync import BlockingGradReducer, GradReducer
from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
from megatron.parallel.tensor_parallel import apply_tensor_parallel


def gpt_module(model_cfg, ps) -> torch.nn.Module:
    """The bare model of ``--model-family`` (default "gpt", see megatron.model.families) holding ``ps.ep_rank``'s
    experts."""
    return build_family_model(model_cfg.model_family, model_cfg, ep_rank=ps.ep_rank, ep_size=ps.ep_size)


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


def build_grad_reducer(model: torch.nn.Module, ps, overlap: bool) -> GradReducer:
    """``--overlap-grad-reduce`` (with more than one process) overlaps the reduction with backward."""
    if overlap and ps.distributed:
        return OverlappedGradReducer(model, ps)
    return BlockingGradReducer(model, ps)
