"""One batched KV cache that rows join (prefill) and leave (keep) between decode steps.

Shapes: B rows, T new tokens, L cached keys, nh heads, hd head dim, V vocabulary.

Every row is a contiguous span right-aligned in the cache: joining rows are left-padded to the
running length (or the running rows to theirs), and padded keys are marked invalid in the cache's
shared "valid" tensor, which the model's attention mask keeps out of attention. Positions are per
row, so a row computes the same thing whatever shares the batch. Columns no live row uses are cut
off when rows leave, so the cache never holds more than the longest live row.
"""
from __future__ import annotations

from typing import Optional

import torch


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


class BatchState:
    """The running rows' KV caches (one dict per layer: "k", "v" [B, nh, L, hd] and the shared "valid" [B, L])."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: Optional[list[dict]] = None

    @property
    def rows(self) -> int:
        return 0 if self.caches is None else self.caches[0]["valid"].shape[0]

    @property
    def length(self) -> int:
        return 0 if self.caches is None else self.caches[0]["valid"].shape[1]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Left-padded prompts tokens/valid [B', T] join the batch as its last B' rows -> logits [B', T, V] with
        ``all_logits`` (scoring the prompt), else [B', 1, V]: the last position's, all that sampling needs."""
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # [B', T]: 0 at each row's first real token
        caches = [dict() for _ in self.model.layers]
        logits, _ = self.model(tokens, position_ids=positions, token_mask=valid, kv_caches=caches,
                               last_logits_only=not all_logits)
        self._join(caches, valid)
        return logits

    def _join(self, new: list[dict], valid: torch.Tensor) -> None:
        if self.caches is None:
            self.caches = new
            for c in new:
                c["valid"] = valid
            return
        L_old, L_new = self.length, valid.shape[1]
        L = max(L_old, L_new)
        merged_valid = torch.cat([_left_pad(self.caches[0]["valid"], L - L_old, 1), _left_pad(valid, L - L_new, 1)])
        for old, c in zip(self.caches, new):
            for key in ("k", "v"):  # [B, nh, L, hd]
                old[key] = torch.cat([_left_pad(old[key], L - L_old, 2), _left_pad(c[key], L - L_new, 2)])
            old["valid"] = merged_valid

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens, positions [B] -> logits [B, V]."""
        logits, _ = self.model(tokens[:, None], position_ids=positions[:, None], kv_caches=self.caches)
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` (in this order) stay; columns that no remaining row uses are dropped."""
        if self.caches is None:
            return
        if not rows:
            self.caches = None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        valid = self.caches[0]["valid"].index_select(0, idx)  # [B, L]
        used = valid.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else valid.shape[1]
        valid = valid[:, start:]
        for c in self.caches:
            for key in ("k", "v"):
                c[key] = c[key].index_select(0, idx)[:, :, start:]
            c["valid"] = valid
