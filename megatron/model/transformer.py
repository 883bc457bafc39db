"""Transformer layer built from the block specification (GPT-3 by default, Llama-style by flags).

Pre-norm (LayerNorm or RMSNorm), causal SDPA self-attention (multi-head or grouped-query, optional
q/k norm per head, learned positions outside or RoPE on q and k inside), GeLU or SwiGLU MLP (or MoE).

Parameter layouts (what tensor parallelism, the HF conversion and ``init_rng`` rely on):
- ``attention.qkv.weight`` [(nh + 2 ng) hd, H]: the q rows of every head, then the k rows of every
  key/value group, then the v rows (ng = nh without GQA: GPT's [3H, H]);
- ``mlp.fc1.weight`` [F, H] (GeLU) or [2F, H] (SwiGLU: the gate rows, then the up rows);
- with --multi-latent-attention the attention is :class:`megatron.model.mla.MultiLatentAttention` (its own names).

Shapes: B batch, T sequence, H hidden, nh heads, ng key/value groups, hd head dim, F MLP width.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.fused import norm
from megatron.model.kv_cache import LayerKV
from megatron.model.mla import mla_from_config
from megatron.model.param_tags import mark_output_layer
from megatron.model.rope import RotaryTables, YarnParams, apply_rotary, rotary_tables


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, *, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: Optional[str] = None, norm_eps: float = 1e-5, rotary_dim: int = 0,
                 rotary_base: float = 10000.0, qk_norm_full: bool = False):
        """``qk_norm``: None or the norm kind applied per head to q and k; ``rotary_dim`` > 0: RoPE on that many
        leading dims of each head."""
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        hd = self.head_dim
        self.qkv = nn.Linear(hidden_size, (num_heads + 2 * self.num_kv_heads) * hd, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * hd, hidden_size, bias=proj_bias)
        mark_output_layer(self.proj)
        self.qk_norm_full = qk_norm_full  # OLMoE: over the whole q / k projection, not per head
        if qk_norm is not None:
            self.q_layernorm = norm(qk_norm, num_heads * hd if qk_norm_full else hd, norm_eps)
            self.k_layernorm = norm(qk_norm, self.num_kv_heads * hd if qk_norm_full else hd, norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.rotary_dim, self.rotary_base = rotary_dim, rotary_base
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None,
                attn_mask: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None) -> torch.Tensor:
        # x: [B, T, H]; kv_cache: this layer's keys / values so far, [B, ng, T_past, hd] each (appended to);
        # attn_mask: [B, 1, T, T_past + T] bool from padding_attention_mask, or None for plain causal attention;
        # rope: cos / sin tables of the tokens' positions (None: positions count on from the cache length)
        nh, ng, hd = self.num_heads, self.num_kv_heads, self.head_dim  # this rank's heads under TP
        qkv = self.qkv(x)  # [B, T, (nh + 2 ng) hd] (sequence parallelism: x is [B, T/TP, H], gathered by qkv)
        B, T, _ = qkv.shape
        q, k, v = qkv.split([nh * hd, ng * hd, ng * hd], dim=-1)
        if self.q_layernorm is not None and self.qk_norm_full:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q = q.view(B, T, nh, hd)
        k = k.view(B, T, ng, hd)
        if self.q_layernorm is not None and not self.qk_norm_full:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, nh, T, hd], [B, ng, T, hd]
        v = v.view(B, T, ng, hd).transpose(1, 2)  # [B, ng, T, hd]
        if self.rotary_dim:
            if rope is None:
                start = kv_cache.length if kv_cache is not None else 0
                rope = rotary_tables(torch.arange(start, start + T, device=x.device)[None], self.rotary_dim,
                                     self.rotary_base)
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [B, ng, T_past + T, hd] each (the grouped heads are cached)
        gqa = {"enable_gqa": True} if ng != nh else {}  # key/value group j serves query heads j nh/ng ...
        dropout = self.attention_dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, **gqa)
        else:
            T_k = k.shape[2]
            if T_k != T and T > 1:
                raise NotImplementedError("multi-token append to a non-empty KV cache")
            # no cache / first chunk: causal; one new token after the cache: it attends to everything
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T_k == T, **gqa)  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, nh * hd))  # [B, T, nh*hd] -> [B, T, H]


class MLP(nn.Module):
    """Dense MLP H -> F -> H: GeLU, or SwiGLU (``fc1`` [2F, H] = gate rows then up rows; silu(gate) * up)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, swiglu: bool = False, bias: bool = True):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(hidden_size, 2 * ffn_hidden_size if swiglu else ffn_hidden_size, bias=bias)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        mark_output_layer(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # [..., F] or [..., 2F] (under TP: this rank's gate and up columns)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


def mlp_from_config(cfg, ffn_hidden_size: Optional[int] = None) -> MLP:
    """The dense MLP the block specification of ModelConfig ``cfg`` names (width ``ffn_hidden_size`` or cfg's)."""
    return MLP(cfg.hidden_size, ffn_hidden_size or cfg.ffn_hidden_size, swiglu=cfg.swiglu, bias=cfg.add_bias_linear)


class DenseMLPBlock(nn.Module):
    """The MLP slot of a dense layer: same (output, stats) interface as :class:`MoELayer`."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, swiglu: bool = False, bias: bool = True):
        super().__init__()
        self.mlp = MLP(hidden_size, ffn_hidden_size, swiglu=swiglu, bias=bias)

    def forward(self, x: torch.Tensor, token_mask=None):
        return self.mlp(x), None


def rotary_dim(cfg) -> int:
    """Dims of each head RoPE rotates (0: no RoPE; multi-latent attention: its --qk-pos-emb-head-dim)."""
    if cfg.rope and getattr(cfg, "multi_latent_attention", False):
        return cfg.qk_pos_emb_head_dim
    return int(cfg.head_dim * cfg.rotary_percent) if cfg.rope else 0


def yarn_params(cfg) -> Optional[YarnParams]:
    """The YaRN parameters of --rope-type yarn (None: plain RoPE)."""
    if getattr(cfg, "rope_type", None) != "yarn" or cfg.rotary_scaling_factor <= 1:
        return None
    return YarnParams(cfg.rotary_scaling_factor, cfg.original_max_position_embeddings, cfg.beta_fast, cfg.beta_slow,
                      cfg.mscale, cfg.mscale_all_dim)


def rope_tables(cfg, position_ids: torch.Tensor) -> RotaryTables:
    """position_ids [B or 1, T] -> the RoPE cos / sin tables of ModelConfig ``cfg`` (its rotary dims, base, YaRN)."""
    return rotary_tables(position_ids, rotary_dim(cfg), cfg.rotary_base, yarn_params(cfg))


class TransformerLayer(nn.Module):
    def __init__(self, cfg, layer_number: int, mlp: nn.Module):
        super().__init__()
        self.layer_number = layer_number
        eps = cfg.layernorm_epsilon
        self.input_layernorm = norm(cfg.normalization, cfg.hidden_size, eps)
        if getattr(cfg, "multi_latent_attention", False):  # DeepSeek-V3's MLA (megatron/model/mla.py)
            self.attention = mla_from_config(cfg, yarn_params(cfg))
        else:
            self.attention = SelfAttention(
                cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout, num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, proj_bias=cfg.add_bias_linear,
                qk_norm=cfg.normalization if cfg.qk_layernorm else None, norm_eps=eps, rotary_dim=rotary_dim(cfg),
                rotary_base=cfg.rotary_base, qk_norm_full=getattr(cfg, "qk_layernorm_full", False))
        self.post_attention_layernorm = norm(cfg.normalization, cfg.hidden_size, eps)
        self.mlp = mlp  # DenseMLPBlock or MoELayer: forward(x, token_mask) -> (y, stats | None)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, kv_cache: Optional[LayerKV] = None,
                attn_mask: Optional[torch.Tensor] = None, rope: Optional[RotaryTables] = None):
        # x: [B, T, H]; token_mask [B, T] bool or None -> ([B, T, H], moe stats or None)
        x = x + self.hidden_dropout(self.attention(self.input_layernorm(x), kv_cache, attn_mask, rope))
        y, stats = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + self.hidden_dropout(y), stats
