"""AdamW with Megatron's parameter groups: no weight decay on biases and norms; experts apart."""
from __future__ import annotations

import torch

from megatron.parallel.param_tags import is_expert


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


def build_optimizer(model: torch.nn.Module, opt_cfg, device: torch.device, ps=None):
    """torch AdamW, the ZeRO-1 sharded AdamW with ``--use-distributed-optimizer``, or with ``--zero-stage 2``
    the ZeRO-2 AdamW that also shards the gradients (the training step then calls its ``reduce_gradients``)."""
    if opt_cfg.zero_stage == 2 and ps is not None:
        from megatron.parallel.zero2 import ShardedGradients

        return ShardedGradients(model, opt_cfg, ps)
    if opt_cfg.use_distributed_optimizer and ps is not None:
        from megatron.parallel.distributed_optimizer import DistributedAdamW

        return DistributedAdamW(model, opt_cfg, ps)
    kwargs = dict(lr=opt_cfg.lr, betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2), eps=opt_cfg.adam_eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), **kwargs)
