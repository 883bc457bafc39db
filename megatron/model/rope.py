"""Rotary position embeddings (RoPE), transformers' Llama convention.

The rotated part of a head (its first ``rot = int(hd * rotary_percent)`` dims) is split in two halves,
rotated as ``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``, frequencies
``base ** (-2 i / rot)`` for i < rot / 2 repeated over both halves; the other dims pass through
(partial rotary, Megatron-LM's --rotary-percent). The cos / sin tables are computed per forward from
the positions (no buffer: the model is built on the meta device and ``init_weights`` zeroes buffers).

Multi-latent attention rotates its rotary part in DeepSeek's interleaved layout (:func:`apply_rotary_interleaved`),
optionally with YaRN frequencies (:class:`YarnParams`, --rope-type yarn).

Shapes: B batch, T tokens, n heads, hd head dim, rot rotated dims.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class RotaryTables(NamedTuple):
    cos: torch.Tensor  # [B or 1, 1, T, rot] fp32
    sin: torch.Tensor
    yarn: Optional["YarnParams"] = None  # the YaRN parameters the tables were made with (None: plain RoPE)


def inv_freq(rot_dim: int, base: float, device=None) -> torch.Tensor:
    """[rot / 2] fp32 inverse frequencies (as transformers computes them)."""
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64, device=device).float() / rot_dim))


def rotary_tables(position_ids: torch.Tensor, rot_dim: int, base: float,
                  yarn: Optional[YarnParams] = None) -> RotaryTables:
    """position_ids [B or 1, T] -> cos, sin [B or 1, 1, T, rot] (fp32); ``yarn``: YaRN's frequencies and its
    attention factor on cos / sin (None, or a factor <= 1: plain RoPE)."""
    if yarn is None or yarn.factor <= 1:
        inv, scale = inv_freq(rot_dim, base, position_ids.device), 1.0
    else:
        inv, scale = yarn_inv_freq(rot_dim, base, yarn, position_ids.device), yarn.attention_factor()
    freqs = position_ids[..., None].float() * inv  # [B, T, rot / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rot]
    yarn = yarn if yarn is not None and yarn.factor > 1 else None
    if scale == 1.0:
        return RotaryTables(emb.cos()[:, None], emb.sin()[:, None], yarn)
    return RotaryTables((emb.cos() * scale)[:, None], (emb.sin() * scale)[:, None], yarn)


# ---- YaRN (DeepSeek-V3's context extension), as transformers' _compute_yarn_parameters / Megatron-LM's MLA

def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class YarnParams(NamedTuple):
    """--rotary-scaling-factor, --original-max-position-embeddings, --beta-fast, --beta-slow, --mscale,
    --mscale-all-dim."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def attention_factor(self) -> float:
        """The factor on cos / sin (transformers' rule: the mscale ratio when both are set, else mscale 1;
        Megatron-LM divides by yarn_get_mscale(factor, mscale_all_dim) = 1 when mscale_all_dim is 0 instead)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)
        return yarn_get_mscale(self.factor)

    def softmax_factor(self) -> float:
        """The factor on the softmax scale (MLA): yarn_get_mscale(factor, mscale_all_dim) ** 2 (1 without it)."""
        if self.factor <= 1 or not self.mscale_all_dim:
            return 1.0
        m = yarn_get_mscale(self.factor, self.mscale_all_dim)
        return m * m


def yarn_inv_freq(rot_dim: int, base: float, yarn: YarnParams, device=None) -> torch.Tensor:
    """[rot / 2] fp32 YaRN inverse frequencies: interpolated (/ factor) below the correction range, the plain
    ones above it, a linear ramp between (the range's ends floored / ceiled, transformers' truncate=True)."""
    def correction_dim(rotations: float) -> float:
        return rot_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rot_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (yarn.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(rot_dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the plain frequency (fast-rotating dims), 0: interpolated
    return interpolation * (1 - keep) + extrapolation * keep


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


def apply_rotary_interleaved(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """DeepSeek's interleaved layout (transformers' ``apply_rotary_pos_emb_interleave``, Megatron-LM's MLA): the
    pairs (x0, x1), (x2, x3), ... are each rotated by one frequency, and the result comes out de-interleaved,
    [evens rotated; odds rotated] (the same for q and k, so q . k is that of the pairs). x [B, n, T, rot] (all of
    its dims rotate) -> [B, n, T, rot] in x's dtype; ``tables``' rot = x's last dim."""
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # the tables are cat(freqs, freqs): one angle per pair
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
