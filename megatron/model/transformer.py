"""GPT-3 style transformer layer: pre-LayerNorm, causal SDPA attention, GeLU MLP (or MoE).

Shapes: B batch, T sequence, H hidden, nh heads, hd head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.fused import layer_norm
from megatron.model.kv_cache import LayerKV
from megatron.model.param_tags import mark_output_layer


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        mark_output_layer(self.proj)
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [B, T, H]; kv_cache: this layer's keys / values so far, [B, nh, T_past, hd] each (appended to);
        # attn_mask: [B, 1, T, T_past + T] bool from padding_attention_mask, or None for plain causal attention.
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, nh, T, hd]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [B, nh, T_past + T, hd] each
        dropout = self.attention_dropout if self.training else 0.0
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            T_k = k.shape[2]
            if T_k != T and T > 1:
                raise NotImplementedError("multi-token append to a non-empty KV cache")
            # no cache / first chunk: causal; one new token after the cache: it attends to everything
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T_k == T)  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, nh*hd] -> [B, T, H]


class MLP(nn.Module):
    """Dense GeLU MLP H -> F -> H. Returns (output, None) like the MoE layer returns (output, stats)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)
        mark_output_layer(self.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DenseMLPBlock(nn.Module):
    """The MLP slot of a dense layer: same (output, stats) interface as :class:`MoELayer`."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.mlp = MLP(hidden_size, ffn_hidden_size)

    def forward(self, x: torch.Tensor, token_mask=None):
        return self.mlp(x), None


class TransformerLayer(nn.Module):
    def __init__(self, cfg, layer_number: int, mlp: nn.Module):
        super().__init__()
        self.layer_number = layer_number
        self.input_layernorm = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.attention_dropout)
        self.post_attention_layernorm = layer_norm(cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = mlp  # DenseMLPBlock or MoELayer: forward(x, token_mask) -> (y, stats | None)
        self.hidden_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, kv_cache: Optional[LayerKV] = None,
                attn_mask: Optional[torch.Tensor] = None):
        # x: [B, T, H]; token_mask [B, T] bool or None -> ([B, T, H], moe stats or None)
        x = x + self.hidden_dropout(self.attention(self.input_layernorm(x), kv_cache, attn_mask))
        y, stats = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + self.hidden_dropout(y), stats
