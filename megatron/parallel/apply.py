"""The whole parallel plan of a run, in order: build -> tensor parallel -> expert parallel -> pipeline stage ->
data parallel.

``build_model`` is the single place that constructs a model for a run, shard-locally: the module
is built on the meta device with this rank's experts (``ep_rank``'s share of each MoE layer), the
tensor-parallel swaps and the expert-parallel token dispatcher are applied there (shapes only, no
values), then the rank gets storage for its own shard alone (``to_empty``). With a ``seed`` the
weights are then initialised in place, each element by its position in the full tensor
(``megatron.model.init_rng``), so no rank ever holds the full model and any TP / EP layout starts from
the same weights; without one the storage stays uninitialised, for weights that come from a
checkpoint. ``build_grad_reducer`` is the data-parallel step of the plan (how gradients are summed
over DP and EDP); the sharded optimizers (ZeRO-1 / ZeRO-2) are chosen in ``megatron.optim.build``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.config.pipeline_layout import PipelineLayout
from megatron.model.families import build_family_model
from megatron.parallel.expert_parallel import apply_expert_parallel
from megatron.parallel.grad_sync import BlockingGradReducer, GradReducer
from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
from megatron.parallel.pipeline.stage_model import keep_stage_parts
from megatron.parallel.tensor_parallel import apply_tensor_parallel


def gpt_module(model_cfg, ps) -> torch.nn.Module:
    """The bare model of ``--model-family`` (default "gpt", see megatron.model.families) holding ``ps.ep_rank``'s
    experts."""
    return build_family_model(model_cfg.model_family, model_cfg, ep_rank=ps.ep_rank, ep_size=ps.ep_size)


def build_model(model_cfg, ps, device: Optional[torch.device] = None, seed: Optional[int] = None,
                module_fn: Optional[Callable[[], torch.nn.Module]] = None,
                pipeline: Optional[PipelineLayout] = None) -> torch.nn.Module:
    """The model on ``device`` (default ``ps.device``), TP-sharded and expert-parallel.

    ``module_fn()`` builds the bare module (default: the GPT model of ``model_cfg``); a training
    script's ``model_provider`` hook plugs in here. It runs under ``torch.device("meta")``, and the
    module's ``init_weights(seed)`` must accept the model as sharded (``GPTModel.init_weights`` does).
    Host memory: this rank's shard plus a megabyte of generator blocks (a model on a GPU is filled from
    the host block by block). With a ``pipeline`` layout the model keeps only ``ps.pp_rank``'s stages
    (``megatron.parallel.pipeline.stage_model.keep_stage_parts``), pruned before it gets storage.
    """
    module_fn = module_fn or (lambda: gpt_module(model_cfg, ps))
    device = device or ps.device
    with torch.device("meta"):
        model = module_fn()
    apply_tensor_parallel(model, ps)
    apply_expert_parallel(model, ps)
    if pipeline is not None:
        keep_stage_parts(model, pipeline, ps.pp_rank)
    _to_empty(model, device)
    if device.type != "meta":
        for m in model.modules():  # non-persistent buffers (no init_weights, no checkpoint) start at their value
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()
    if seed is not None and device.type != "meta":
        model.init_weights(seed)
    return model


def _to_empty(model: torch.nn.Module, device: torch.device) -> None:
    """Storage on ``device`` for every parameter and buffer, keeping the parameters' tags (expert, TP shard,
    ...): moving off the meta device replaces the Parameter objects, and the tags are their attributes."""
    tags = {name: dict(vars(p)) for name, p in model.named_parameters()}
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        for key, value in tags.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)


def build_grad_reducer(model: torch.nn.Module, ps, overlap: bool) -> GradReducer:
    """``--overlap-grad-reduce`` (with more than one process) overlaps the reduction with backward."""
    if overlap and ps.distributed:
        return OverlappedGradReducer(model, ps)
    return BlockingGradReducer(model, ps)
