"""Sparse upcycling (Komatsuzaki et al., 2022): a dense checkpoint becomes an MoE checkpoint whose model
computes the dense model's function at step 0.

Every expert of an MoE layer is a copy of that layer's dense MLP (GeLU or SwiGLU, with or without biases:
a Llama / Qwen dense checkpoint becomes a Mixtral / Qwen-MoE shape). The combine weight decides the output
scale:

- top-2 renormalises the two chosen probabilities to sum to 1: the output is the dense MLP's, unchanged,
  whatever the router says, so the router keeps its random initialisation (as Megatron-LM's upcycling);
- otherwise the router weights are zero, so its softmax is uniform (1/E for each expert) and, in evaluation
  routing, every token picks expert 0:
- top-1 scales the chosen expert's output by its probability 1/E (DeepSpeed does not renormalise top-1),
  so each expert's output projection (w2, b2) is multiplied by E: (1/E) * E * mlp(x) = mlp(x);
- Residual-MoE mixes the expert output and a dense MLP with softmax(coefficient(x)): the residual MLP is
  another copy of the dense MLP and the coefficient layer is zero, giving 1/2 + 1/2 of the same function.

In training the router then learns from zero; with top-1 the E-fold scale meets a gate probability that
grows from 1/E, so the output scale can grow with it (at most E-fold) as the router sharpens.
"""
from __future__ import annotations

import copy

import torch

from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.checkpoint.weights_only import write_weights_checkpoint
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.inference.load import load_model
from megatron.model.gpt_model import GPTModel
from megatron.model.moe.layer import MoELayer


def upcycle_model(dense, moe) -> None:
    """Fill ``moe`` (GPTModel, every expert local) from ``dense`` (GPTModel without MoE layers)."""
    dense_params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in dense_params:
                p.copy_(dense_params[name])
        for layer_dense, layer_moe in zip(dense.layers, moe.layers):
            m = layer_moe.mlp
            if not isinstance(m, MoELayer):
                continue
            mlp = layer_dense.mlp.mlp
            scale = float(m.num_experts) if m.topk == 1 else 1.0
            # SwiGLU: fc1 [2F, H] is [gate; up] rows and w1 [E, H, 2F] gate columns then up, so the same copy
            m.experts.w1.copy_(mlp.fc1.weight.t()[None].expand_as(m.experts.w1))  # [E, H, F]
            m.experts.w2.copy_(scale * mlp.fc2.weight.t()[None].expand_as(m.experts.w2))  # [E, F, H]
            if getattr(m.experts, "b1", None) is not None:  # none under --disable-bias-linear (Llama-style)
                m.experts.b1.copy_(mlp.fc1.bias[None].expand_as(m.experts.b1))
            if getattr(m.experts, "b2", None) is not None:
                m.experts.b2.copy_(scale * mlp.fc2.bias[None].expand_as(m.experts.b2))
            if m.topk != 2:
                m.router.wg.weight.zero_()
            # top-2 renormalises the two chosen weights: with equal experts any router gives the dense function,
            # so the router keeps its random initialisation (Megatron-LM's upcycling) and breaks the symmetry
            if m.residual:
                m.residual_mlp.load_state_dict(mlp.state_dict())
                m.coefficient.weight.zero_()
                m.coefficient.bias.zero_()


def upcycle_checkpoint(load: str, save_dir: str, num_experts: list, expert_interval: int, mlp_type: str,
                       topk: int) -> dict:
    _, common = read_checkpoint_config(load)
    config = copy.deepcopy(common["config"])
    if ModelConfig.from_dict(config["model"]).moe.enabled:
        raise UserError(f"--load {load}: this checkpoint already has MoE layers; upcycle starts from a dense one")
    if any(e < 2 for e in num_experts):
        raise UserError(f"--num-experts {num_experts}: each MoE layer needs at least 2 experts")
    config["model"]["moe"].update(num_experts=list(num_experts), expert_interval=expert_interval, mlp_type=mlp_type,
                                  topk=topk, expert_parallel_size=1)
    cfg = ModelConfig.from_dict(config["model"])
    cfg.validate()
    dense = load_model(load, "cpu").model
    moe = GPTModel(cfg)
    upcycle_model(dense, moe)
    write_weights_checkpoint(save_dir, moe, config, int(common["iteration"]), int(common.get("consumed_samples") or 0))
    return {"from_iteration": int(common["iteration"]), "experts_per_layer": cfg.moe.experts_per_layer(cfg.num_layers)}
