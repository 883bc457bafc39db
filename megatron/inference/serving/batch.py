"""One batched KV cache that rows join (prefill) and leave (keep) between decode steps.

Shapes: B rows, T new tokens, L cached keys, nh heads, hd head dim, V vocabulary.

Every row is a contiguous span right-aligned in the cache: joining rows are left-padded to the
running length (or the running rows to theirs), and padded keys are marked invalid in the cache's
key validity, which the model's attention mask keeps out of attention. Positions are per
row, so a row computes the same thing whatever shares the batch. Columns no live row uses are cut
off when rows leave, so the cache never holds more than the longest live row.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron.model.kv_cache import KVCache, left_padded_positions


class BatchState:
    """The running rows' :class:`~megatron.model.kv_cache.KVCache` (k, v [B, nh, L, hd] per layer, valid [B, L])."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache: Optional[KVCache] = None

    @property
    def rows(self) -> int:
        return 0 if self.cache is None else self.cache.valid.shape[0]

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.valid.shape[1]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Left-padded prompts tokens/valid [B', T] join the batch as its last B' rows -> logits [B', T, V] with
        ``all_logits`` (scoring the prompt), else [B', 1, V]: the last position's, all that sampling needs."""
        positions = left_padded_positions(valid)  # [B', T]
        cache = self.model.new_cache()
        logits = self.model.decode(tokens, cache, positions, token_mask=valid, all_logits=all_logits).logits
        if self.cache is None:
            cache.valid = valid  # kept even when nothing is padded: rows that join later may be
            self.cache = cache
        else:
            self.cache.join(cache, valid)
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens, positions [B] -> logits [B, V]."""
        logits = self.model.decode(tokens[:, None], self.cache, positions[:, None]).logits  # [B, 1, V]
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` (in this order) stay; columns that no remaining row uses are dropped."""
        if self.cache is None:
            return
        if not rows:
            self.cache = None
            return
        self.cache.keep_rows(rows)
