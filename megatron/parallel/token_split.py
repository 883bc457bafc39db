"""Splitting the MoE layer's tokens over the tensor-parallel ranks, and gathering them back.

Under tensor parallelism the MoE layer is replicated: every TP rank routes the same tokens. Running the
experts on all of them on every TP rank would repeat the expert work (and the all-to-all) TP times. The
paper's parallelism-coordinated communication (DeepSpeed's ``drop_tokens`` / ``gather_tokens``) instead
gives each TP rank 1/TP of the dispatched tokens after routing, runs the experts and the all-to-all on
that share only, and all-gathers the experts' output before the combine, which stays replicated.

Two autograd functions (``megatron/parallel/collectives.py``) along one dimension of a tensor that is
identical on every TP rank:

- :func:`split_to_tp`: forward keeps this rank's chunk (the dimension padded with zeros to a multiple of
  TP, so chunks are equal); backward all-gathers the chunks' gradients, so the replicated input gets its
  full gradient on every rank (as a replicated region must);
- :func:`gather_from_tp`: forward all-gathers the chunks and drops the padding; backward keeps this rank's
  chunk of the (replicated) gradient.

The experts' weight gradients then cover only this rank's share of the tokens: they are summed over
the TP ranks with the expert-data-parallel reduction (the EDP group includes the TP ranks, see
``megatron/parallel/state.py``).
"""
from __future__ import annotations

import torch

from megatron.parallel.collectives import chunk_length


def chunk_counts(counts: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Per-expert rows of this rank's chunk of an expert-sorted row list with ``counts`` [E] rows per expert."""
    total = int(counts.sum())
    c = chunk_length(total, size)
    lo, hi = min(rank * c, total), min((rank + 1) * c, total)
    end = torch.cumsum(counts, 0)  # [E] one past each expert's last row
    start = end - counts  # [E]
    return (torch.clamp(end, max=hi) - torch.clamp(start, min=lo)).clamp_(min=0)  # [E]
