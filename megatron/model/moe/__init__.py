"""DeepSpeed-MoE layer: a router from the registry (``routers/``), a token dispatcher
(``dispatchers.py``), stacked experts, Residual-MoE, and typed statistics (``metrics.py``).

The layer contains no communication. Expert parallelism installs the all-to-all dispatcher from
``megatron.parallel.expert_parallel`` with ``MoELayer.set_dispatcher``.
"""
from megatron.model.moe.layer import MoELayer  # noqa: F401
