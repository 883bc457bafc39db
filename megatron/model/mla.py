"""Multi-latent attention (MLA, DeepSeek-V2 / V3), as transformers' ``DeepseekV3Attention`` computes it.

    q:  x -> linear_q_down_proj [q_lora, H] -> q_layernorm (RMSNorm) -> linear_q_up_proj [nh (dn + dr), q_lora]
        (or one linear_q_proj [nh (dn + dr), H] without --q-lora-rank), per head [q_nope (dn); q_pe (dr)]
    kv: x -> linear_kv_down_proj [kv_lora + dr, H] -> [c_kv (kv_lora); k_pe (dr, one head shared by all)],
        c_kv -> kv_layernorm (RMSNorm) -> linear_kv_up_proj [nh (dn + dv), kv_lora], per head [k_nope; v]
    RoPE on q_pe and k_pe in DeepSeek's interleaved layout (:func:`~megatron.model.rope.apply_rotary_interleaved`,
    transformers' ``rope_interleave=True`` / Megatron-LM's MLA); k = [k_nope; k_pe], q = [q_nope; q_pe];
    softmax scale (dn + dr) ** -0.5 (x yarn_get_mscale(factor, mscale_all_dim) ** 2 with YaRN); output proj [H, nh dv].

Names (Megatron-LM's MLA; transformers' in brackets): linear_q_proj [q_proj], linear_q_down_proj [q_a_proj],
q_layernorm [q_a_layernorm], linear_q_up_proj [q_b_proj], linear_kv_down_proj [kv_a_proj_with_mqa],
kv_layernorm [kv_a_layernorm], linear_kv_up_proj [kv_b_proj], proj [o_proj]. Biases (--add-bias-linear's
default, transformers' ``attention_bias``) on the down projections and proj only, as transformers.

KV cache: the full per-head keys [B, nh, L, dn + dr] and values [B, nh, L, dv] (not the latent): simplest,
and decoding equals a full forward. Tensor parallelism (megatron.parallel.tensor_parallel) splits the heads: the
up projections column-parallel, proj row-parallel; the down projections and latent norms stay whole on every
rank, and ``shared_rope_key`` (identity here) becomes Megatron's f on the rotary key every head shares, so its
gradient is summed over the ranks' heads.

Shapes: B batch, T tokens, H hidden, nh heads, dn = --qk-head-dim, dr = --qk-pos-emb-head-dim,
dv = --v-head-dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.fused import RMSNorm
from megatron.model.kv_cache import LayerKV
from megatron.model.param_tags import mark_output_layer
from megatron.model.rope import RotaryTables, YarnParams, apply_rotary_interleaved, rotary_tables


class MultiLatentAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, *, q_lora_rank: Optional[int],
                 kv_lora_rank: int, qk_head_dim: int, qk_pos_emb_head_dim: int, v_head_dim: int, bias: bool = False,
                 rotary_base: float = 10000.0, yarn: Optional[YarnParams] = None):
        super().__init__()
        H, nh = hidden_size, num_heads
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = nh, q_lora_rank, kv_lora_rank
        self.qk_head_dim, self.qk_pos_emb_head_dim, self.v_head_dim = qk_head_dim, qk_pos_emb_head_dim, v_head_dim
        q_dim = qk_head_dim + qk_pos_emb_head_dim
        if q_lora_rank is None:
            self.linear_q_proj = nn.Linear(H, nh * q_dim, bias=False)
        else:
            self.linear_q_down_proj = nn.Linear(H, q_lora_rank, bias=bias)
            # transformers' DeepseekV3RMSNorm: eps 1e-6 whatever rms_norm_eps says
            self.q_layernorm = RMSNorm(q_lora_rank, 1e-6)
            self.linear_q_up_proj = nn.Linear(q_lora_rank, nh * q_dim, bias=False)
        self.linear_kv_down_proj = nn.Linear(H, kv_lora_rank + qk_pos_emb_head_dim, bias=bias)
        self.kv_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.linear_kv_up_proj = nn.Linear(kv_lora_rank, nh * (qk_head_dim + v_head_dim), bias=False)
        self.proj = nn.Linear(nh * v_head_dim, H, bias=bias)
        mark_output_layer(self.proj)
        self.shared_rope_key = nn.Identity()  # tensor parallelism: the gradient sum over the ranks' heads
        self.rotary_base, self.yarn = rotary_base, yarn if yarn is not None and yarn.factor > 1 else None
        self.softmax_scale = q_dim ** -0.5 * (yarn.softmax_factor() if yarn is not None else 1.0)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None,
                attn_mask: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None) -> torch.Tensor:
        # x: [B, T, H]; kv_cache: this layer's keys [B, nh, L, dn + dr] / values [B, nh, L, dv] (appended to);
        # attn_mask: [B, 1, T, L + T] bool or None (causal); rope: cos / sin [B or 1, 1, T, dr] of the positions
        B, T, _ = x.shape
        nh, dn, dr, dv = self.num_heads, self.qk_head_dim, self.qk_pos_emb_head_dim, self.v_head_dim
        if self.q_lora_rank is None:
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        q = q.view(B, T, nh, dn + dr).transpose(1, 2)  # [B, nh, T, dn + dr]
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        c_kv, k_pe = self.linear_kv_down_proj(x).split([self.kv_lora_rank, dr], dim=-1)  # [B, T, kv_lora], [B, T, dr]
        kv = self.linear_kv_up_proj(self.kv_layernorm(c_kv)).view(B, T, nh, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)  # [B, nh, T, dn], [B, nh, T, dv]
        if rope is None:
            start = kv_cache.length if kv_cache is not None else 0
            rope = rotary_tables(torch.arange(start, start + T, device=x.device)[None], dr, self.rotary_base, self.yarn)
        elif rope.yarn != self.yarn:  # tables made without this block's YaRN: a caller not using rope_tables(cfg)
            raise ValueError(f"multi-latent attention with YaRN {self.yarn} was given RoPE tables of {rope.yarn}: build "
                             f"them with megatron.model.transformer.rope_tables(cfg, position_ids)")
        q_pe = apply_rotary_interleaved(q_pe, rope)
        k_pe = apply_rotary_interleaved(self.shared_rope_key(k_pe)[:, None], rope)  # [B, 1, T, dr]: every head's
        q = torch.cat([q_nope, q_pe], dim=-1)  # [B, nh, T, dn + dr]
        k = torch.cat([k_nope, k_pe.expand(B, nh, T, dr)], dim=-1)
        v = v.contiguous()
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [B, nh, L + T, dn + dr], [B, nh, L + T, dv]
        dropout = self.attention_dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                               scale=self.softmax_scale)
        else:
            T_k = k.shape[2]
            if T_k != T and T > 1:
                raise NotImplementedError("multi-token append to a non-empty KV cache")
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T_k == T,
                                               scale=self.softmax_scale)  # [B, nh, T, dv]
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * dv))  # [B, T, H]

    @staticmethod
    def num_parameters(hidden_size: int, num_heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                       qk_head_dim: int, qk_pos_emb_head_dim: int, v_head_dim: int, bias: bool) -> int:
        """Parameters of one MLA block (as built above)."""
        H, nh, dq = hidden_size, num_heads, qk_head_dim + qk_pos_emb_head_dim
        if q_lora_rank is None:
            n = H * nh * dq
        else:
            n = H * q_lora_rank + q_lora_rank + q_lora_rank * nh * dq + (q_lora_rank if bias else 0)
        n += H * (kv_lora_rank + qk_pos_emb_head_dim) + (kv_lora_rank + qk_pos_emb_head_dim if bias else 0)
        n += kv_lora_rank + kv_lora_rank * nh * (qk_head_dim + v_head_dim)
        n += nh * v_head_dim * H + (H if bias else 0)
        return n


def mla_from_config(cfg, yarn: Optional[YarnParams] = None) -> MultiLatentAttention:
    """The MLA block of ModelConfig ``cfg`` (--multi-latent-attention; ``yarn``: its --rope-type yarn parameters)."""
    return MultiLatentAttention(
        cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_head_dim=cfg.qk_head_dim, qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
        v_head_dim=cfg.v_head_dim, bias=cfg.add_bias_linear, rotary_base=cfg.rotary_base, yarn=yarn)
