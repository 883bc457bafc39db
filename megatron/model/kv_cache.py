"""The attention KV cache of a whole model, for generation and continuous batching.

Shapes: B rows, T new tokens, L cached keys, ng key/value heads (the query heads nh, or the
--num-query-groups with grouped-query attention: the cache holds the grouped heads, not their
repeats), hd head dim. With RoPE the cached keys are stored rotated (by their own positions).

A :class:`KVCache` holds one :class:`LayerKV` per transformer layer (keys and values
[B, ng, L, hd], appended to by each layer's attention) and one key-validity mask ``valid``
[B, L] shared by every layer: None while nothing cached is padding (the decoding fast path),
else False at padded keys, which :meth:`KVCache.attention_mask` keeps out of attention.

Batches of prompts are left-padded, so every row's real tokens are right-aligned; a row's
positions count its real tokens only (:func:`left_padded_positions`), so a row computes the same
thing whatever shares its batch. Continuous batching merges caches (:meth:`KVCache.join`) and
keeps a subset of rows (:meth:`KVCache.keep_rows`).
"""
from __future__ import annotations

from typing import Optional

import torch


def left_padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, T] bool (left-padded rows) -> position ids [B, T]: 0 at each row's first real token (and on
    the padding before it), counting real tokens only."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def _left_pad(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zeros (False) prepended along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


class LayerKV:
    """One attention layer's cached keys and values: k, v [B, ng, L, hd], None before the first append."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new keys / values k, v [B, ng, T, hd] -> all of them, [B, ng, L + T, hd] each."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)  # [B, nh, L + T, hd]
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """Every layer's :class:`LayerKV` and the key validity [B, L] they share (None: every key is real)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerKV() for _ in range(num_layers)]
        self.valid: Optional[torch.Tensor] = None  # [B, L] bool

    def __getitem__(self, i: int) -> LayerKV:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Cached keys per row (L): where the next token's position continues for unpadded rows."""
        return self.layers[0].length if self.layers else 0

    @property
    def rows(self) -> int:
        k = self.layers[0].k if self.layers else None
        return 0 if k is None else k.shape[0]

    # ---- continuous batching
    def join(self, other: "KVCache", other_valid: torch.Tensor) -> None:
        """Append ``other``'s rows (whose key validity is ``other_valid`` [B', L']) after this cache's rows.
        Both are left-padded to the longer length; padded keys are marked invalid."""
        mine = self.valid if self.valid is not None else torch.ones(self.rows, self.length, dtype=torch.bool,
                                                                    device=other_valid.device)
        L_old, L_new = mine.shape[1], other_valid.shape[1]
        L = max(L_old, L_new)
        self.valid = torch.cat([_left_pad(mine, L - L_old, 1), _left_pad(other_valid, L - L_new, 1)])  # [B + B', L]
        for old, new in zip(self.layers, other.layers):  # k, v [B + B', ng, L, hd]
            old.k = torch.cat([_left_pad(old.k, L - L_old, 2), _left_pad(new.k, L - L_new, 2)])
            old.v = torch.cat([_left_pad(old.v, L - L_old, 2), _left_pad(new.v, L - L_new, 2)])

    def keep_rows(self, rows: list[int]) -> None:
        """Only ``rows`` (in this order, at least one) stay; leading columns no remaining row uses are cut."""
        first = self.layers[0].k
        idx = torch.tensor(rows, dtype=torch.long, device=first.device)
        valid = self.valid if self.valid is not None else torch.ones(self.rows, self.length, dtype=torch.bool,
                                                                     device=first.device)
        valid = valid.index_select(0, idx)  # [B', L]
        used = valid.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else valid.shape[1]
        self.valid = valid[:, start:]  # [B', L']
        for layer in self.layers:  # k, v [B', ng, L', hd]
            layer.k = layer.k.index_select(0, idx)[:, :, start:]
            layer.v = layer.v.index_select(0, idx)[:, :, start:]


def padding_attention_mask(token_mask: Optional[torch.Tensor], cache: Optional[KVCache], B: int, T: int,
                           device) -> Optional[torch.Tensor]:
    """[B, 1, T, L + T] bool mask keeping padded keys out of attention, or None when causal attention
    alone is exact (no padding, or padding only at row ends with no cache). ``token_mask`` [B, T] marks the
    new tokens that are real (None: all). Computed once per forward for every layer, before the layers
    append to ``cache``; the cache's key validity is extended by the new tokens' (kept None while
    nothing is padded)."""
    if token_mask is None and (cache is None or cache.valid is None):
        return None  # nothing padded, now or before (the decoding fast path)
    past = cache.length if cache is not None else 0
    new = token_mask if token_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    if cache is not None and (cache.valid is not None or not bool(new.all())):
        old = cache.valid if cache.valid is not None else torch.ones(B, past, dtype=torch.bool, device=device)
        valid = torch.cat([old, new], dim=1)  # [B, L + T]
        cache.valid = valid
    elif cache is None and token_mask is not None:
        valid = token_mask
    else:
        return None  # nothing padded
    T_k = past + T
    if past == 0 and bool((valid.long().cumprod(dim=1).bool() == valid).all()):
        return None  # padding only after each row's real tokens: causal attention never reaches it
    qpos = torch.arange(past, T_k, device=device)[:, None]  # absolute query positions [T, 1]
    kpos = torch.arange(T_k, device=device)[None, :]  # [1, T_k]
    # causal, padded keys masked; a query always sees itself (a padded query would otherwise see nothing)
    return (kpos <= qpos)[None, None] & (valid[:, None, None, :] | (kpos == qpos)[None, None])
