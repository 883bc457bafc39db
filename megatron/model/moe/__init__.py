"""DeepSpeed-MoE layer: a router from the registry (``routers/``), a token dispatcher
(``dispatchers.py``), stacked experts, Residual-MoE, and typed statistics (``metrics.py``).

The layer contains no communication. Expert parallelism installs the dispatcher that ``--moe-token-dispatcher-type`` names
(``megatron.parallel.expert_parallel.TOKEN_DISPATCHERS``) with ``MoELayer.set_dispatcher``.
"""
from megatron.model.moe.layer import MoELayer  # noqa: F401
