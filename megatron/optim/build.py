"""AdamW with Megatron's parameter groups: no weight decay on biases and norms; experts apart."""
from __future__ import annotations

import torch

from megatron.optim.distributed_optimizer import DistributedAdamW
from megatron.optim.param_groups import param_groups
from megatron.optim.zero2 import ShardedGradients


def build_optimizer(model: torch.nn.Module, opt_cfg, device: torch.device, ps=None):
    """torch AdamW, the ZeRO-1 sharded AdamW with ``--use-distributed-optimizer``, or with ``--zero-stage 2``
    the ZeRO-2 AdamW that also shards the gradients (see :func:`shards_gradients`).

    ``--use-torch-fsdp2`` (ZeRO-3): torch AdamW on the model FSDP2 already sharded (``parallel/fsdp.py``): its
    parameters and gradients are DTensor shards, so the Adam state it creates is sharded too."""
    fsdp2 = getattr(opt_cfg, "use_torch_fsdp2", False)  # the sharding is in the parameters: plain AdamW
    if opt_cfg.zero_stage == 2 and ps is not None and not fsdp2:
        return ShardedGradients(model, opt_cfg, ps)
    if opt_cfg.use_distributed_optimizer and ps is not None and not fsdp2:
        return DistributedAdamW(model, opt_cfg, ps)
    kwargs = dict(lr=opt_cfg.lr, betas=(opt_cfg.adam_beta1, opt_cfg.adam_beta2), eps=opt_cfg.adam_eps)
    if device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, opt_cfg.weight_decay), **kwargs)


def shards_gradients(optimizer) -> bool:
    """Whether ``optimizer`` keeps only this rank's shard of the gradients (ZeRO-2, :class:`ShardedGradients`).

    Then the training step calls its ``reduce_gradients`` instead of the all-reduce and unscales, measures and
    clips through its ``scale_gradients`` / ``grad_norm`` / ``clip_gradients``. torch AdamW and the ZeRO-1
    :class:`DistributedAdamW` (``shards_gradients = False``) leave full gradients on every rank.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        return False
    if isinstance(optimizer, DistributedAdamW):
        return optimizer.shards_gradients
    raise TypeError(f"unknown optimizer {type(optimizer).__name__}: neither a torch.optim.Optimizer nor a "
                    f"DistributedAdamW (whose shards_gradients says whether it shards the gradients)")
