"""What every router tells the code outside the registry, as class attributes and methods.

The MoE layer only calls ``forward`` (and ``drop_priority`` under a capacity); the rest of the code
asks the router (an instance, or its class looked up in ``ROUTERS`` by ``--moe-router-type``) instead of
testing its name or type:

- :attr:`plain_eval`: its evaluation routing is ``softmax(x @ wg^T)``, :meth:`select`, gather, so the
  small-batch decode path (``megatron.model.moe.small_batch``) may route through :meth:`route_plain`
  and compute the statistics with :meth:`balancing_loss` / :meth:`z_loss`;
- :meth:`num_parameters`: its parameter count (the analytical counts of ``megatron.planning``);
- :attr:`balances_after_step`: after each optimizer step its ``pending_load`` [E] buffer is summed over
  the data-parallel replicas and passed to ``update_bias(load)``
  (``megatron.parallel.router_balance``);
- :attr:`renormalize_kept`: the layer divides each token's kept weights by their sum after any drop
  (DeepSpeed's top-k); False: the router's weights are final (Megatron-LM / transformers: normalised, or
  not, and scaled inside the router; a dropped choice just loses its share);
- :attr:`wants_sequence_ids`: ``forward(x, seq_ids)`` takes the sequence of each token ([S] int64: its batch
  row) for a per-sequence balancing loss;
- :attr:`hf_router_type`: the routing of the self-contained transformers model
  (``megatron/hf/modeling_megatron_moe.py``) that reproduces its evaluation routing, written as
  ``router_type`` in an export's config.json; None when it cannot be exported.

A subclass inherits these facts: one that changes what they describe sets them again.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn as nn

from megatron.model.moe.routing import Routing


class Router(nn.Module):
    description: ClassVar[str] = ""  # one line, for documentation
    plain_eval: ClassVar[bool] = False
    balances_after_step: ClassVar[bool] = False
    hf_router_type: ClassVar[Optional[str]] = None
    renormalize_kept: ClassVar[bool] = True
    wants_sequence_ids: ClassVar[bool] = False

    @classmethod
    def num_parameters(cls, hidden_size: int, num_experts: int) -> int:
        """Parameters of one router of ``num_experts`` experts (frozen ones included: checkpoints carry them)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Routing:  # x: [S, H]
        raise NotImplementedError

    def drop_priority(self, routing: Routing):
        """[S, k] keep-first key for a capacity-limited dispatch, or None for tier-major position order."""
        return None

    # plain_eval routers only:
    def route_plain(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [S, H] -> (logits [S, E], probs [S, E], indices [S, k], weights [S, k]) in fp32, as forward in evaluation."""
        raise NotImplementedError

    @staticmethod
    def balancing_loss(probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def z_loss(logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
