"""DeepSpeed-MoE layer: fp32 top-k router, index dispatch, stacked experts, Residual-MoE.

The layer contains no communication. Expert parallelism replaces ``layer.experts`` with a
wrapper from ``megatron.parallel.expert_parallel`` that runs the all-to-all around it.
"""
from megatron.model.moe.layer import MoELayer  # noqa: F401
