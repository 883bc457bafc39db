"""Router registry: ``--moe-router-type NAME`` picks ``ROUTERS[NAME]``.

A router is an ``nn.Module`` built as ``cls(hidden_size, num_experts, moe_cfg)`` whose
``forward(x [S, H])`` returns a :class:`~megatron.model.moe.routing.Routing`. To add one, write
it in this package and register it here.
"""
from megatron.model.moe.routers.aux_free import AuxLossFreeRouter
from megatron.model.moe.routers.topk import TopKRouter

ROUTERS = {"topk": TopKRouter, "aux_free": AuxLossFreeRouter}


def build_router(hidden_size: int, num_experts: int, moe_cfg):
    return ROUTERS[moe_cfg.router_type](hidden_size, num_experts, moe_cfg)
