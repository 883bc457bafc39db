"""Router registry: ``--moe-router-type NAME`` picks ``ROUTERS[NAME]``.

A router is a :class:`~megatron.model.moe.routers.base.Router` built as ``cls(hidden_size, num_experts,
moe_cfg)`` whose ``forward(x [S, H])`` returns a :class:`~megatron.model.moe.routing.Routing`; its class
attributes and methods carry what the rest of the code needs to know about it (the small-batch decode
path, the parameter counts, the post-step balancing, the transformers export: see ``base.py``). To add
one, write it in this package and register it here.
"""
from megatron.errors import UserError
from megatron.model.moe.routers.aux_free import AuxLossFreeRouter
from megatron.model.moe.routers.base import Router
from megatron.model.moe.routers.megatron import MegatronAuxFreeRouter, MegatronRouter
from megatron.model.moe.routers.topk import TopKRouter

# "megatron" / "megatron_aux_free" are chosen by the Megatron-LM routing flags (MoEConfig.__post_init__)
ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "aux_free": AuxLossFreeRouter, "megatron": MegatronRouter,
                                    "megatron_aux_free": MegatronAuxFreeRouter}

__all__ = ["ROUTERS", "AuxLossFreeRouter", "MegatronAuxFreeRouter", "MegatronRouter", "Router", "TopKRouter",
           "build_router", "router_class"]


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise UserError(f"--moe-router-type must be one of {', '.join(ROUTERS)} (got {name!r})")
    return ROUTERS[name]


def build_router(hidden_size: int, num_experts: int, moe_cfg):
    return ROUTERS[moe_cfg.router_type](hidden_size, num_experts, moe_cfg)
