"""Rotary position embeddings (RoPE), transformers' Llama convention.

The rotated part of a head (its first ``rot = int(hd * rotary_percent)`` dims) is split in two halves,
rotated as ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``, frequencies
``base ** (-2 i / rot)`` for i < rot / 2 repeated over both halves; the other dims pass through
(partial rotary, Megatron-LM's --rotary-percent). The cos / sin tables are computed per forward from
the positions (no buffer: the model is built on the meta device and ``init_weights`` zeroes buffers).

Shapes: B batch, T tokens, n heads, hd head dim, rot rotated dims.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # [B or 1, 1, T, rot] fp32
    sin: torch.Tensor


def inv_freq(rot_dim: int, base: float, device=None) -> torch.Tensor:
    """[rot / 2] fp32 inverse frequencies (as transformers computes them)."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim))


def rotary_tables(position_ids: torch.Tensor, rot_dim: int, base: float) -> RotaryTables:
    """position_ids [B or 1, T] -> cos, sin [B or 1, 1, T, rot] (fp32)."""
    freqs = position_ids[..., None].float() * inv_freq(rot_dim, base, position_ids.device)  # [B, T, rot / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rot]
    return RotaryTables(emb.cos()[:, None], emb.sin()[:, None])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """x [B, n, T, hd] -> x with its first ``rot`` dims rotated by position (in x's dtype)."""
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
