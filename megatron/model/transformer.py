"""GPT-3 style transformer layer: pre-LayerNorm, causal SDPA attention, GeLU MLP (or MoE).

Shapes: B batch, T sequence, H hidden, nh heads, hd head dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.model.fused import layer_norm


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj.is_output_layer = True
        self.attention_dropout = attention_dropout

    def forward(self, x: torch.Tensor, kv_cache=None, key_valid=None) -> torch.Tensor:
        # x: [B, T, H]; kv_cache: optional dict holding "k", "v" [B, nh, T_past, hd] (updated in place) and,
        # once padding was seen, "valid" [B, T_past]; key_valid: [B, T] bool, False for padding tokens.
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, nh, T, hd]
        valid = key_valid
        if kv_cache is not None:
            T_past = kv_cache["k"].shape[2] if "k" in kv_cache else 0
            if T_past:
                k = torch.cat([kv_cache["k"], k], dim=2)  # [B, nh, T_past + T, hd]
                v = torch.cat([kv_cache["v"], v], dim=2)
            kv_cache["k"], kv_cache["v"] = k, v
            if "valid" in kv_cache or (valid is not None and not bool(valid.all())):
                new = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
                past = kv_cache.get("valid", torch.ones(B, T_past, dtype=torch.bool, device=x.device))
                kv_cache["valid"] = valid = torch.cat([past, new], dim=1)  # [B, T_past + T]
            elif T_past:
                valid = None
        dropout = self.attention_dropout if self.training else 0.0
        T_k = k.shape[2]
        if valid is not None and not _trailing_padding_only(valid, T_k, T):
            # padding before real tokens (left-padded batches): mask padded keys; a query always sees itself
            qpos = torch.arange(T_k - T, T_k, device=x.device)[:, None]  # absolute query positions [T, 1]
            kpos = torch.arange(T_k, device=x.device)[None, :]  # [1, T_k]
            mask = (kpos <= qpos)[None, None] & (valid[:, None, None, :] | (kpos == qpos)[None, None])  # [B, 1, T, T_k]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            if T_k != T and T > 1:
                raise NotImplementedError("multi-token append to a non-empty KV cache")
            # no cache / first chunk: causal; one new token after the cache: it attends to everything
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T_k == T)  # [B, nh, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))  # [B, T, nh*hd] -> [B, T, H]


def _trailing_padding_only(valid: torch.Tensor, T_k: int, T: int) -> bool:
    """True when a causal mask alone is exact for every real query: no cache and padding only at row ends."""
    return T_k == T and bool((valid.long().cumprod(dim=1).bool() == valid).all())


class MLP(nn.Module):
    """Dense GeLU MLP H -> F -> H. Returns (output, None) like the MoE layer returns (output, stats)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)
        self.fc2.is_output_layer = True

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

    def forward(self, x: torch.Tensor, token_mask=None, kv_cache=None):
        # x: [B, T, H] -> ([B, T, H], moe stats or None)
        x = x + self.hidden_dropout(self.attention(self.input_layernorm(x), kv_cache, token_mask))
        y, stats = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + self.hidden_dropout(y), stats
