"""GPT model: learned positions, pre-LN transformer, tied input/output embeddings, MoE per layer.

Shapes: B batch, T sequence, H hidden, V padded vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.model.cross_entropy import linear_cross_entropy
from megatron.model.fused import layer_norm
from megatron.model.kd_loss import cross_entropy_and_kd, linear_cross_entropy_kd
from megatron.model.moe.experts import init_std_for_output
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_output_layer
from megatron.model.transformer import MLP, DenseMLPBlock, TransformerLayer, padding_attention_mask


class TiedOutputLayer(nn.Module):
    """Logits from the (tied) word-embedding matrix. Tensor parallelism swaps in a vocab-parallel one."""

    def forward(self, h: torch.Tensor, weight: torch.Tensor, gather: bool = True) -> torch.Tensor:
        return F.linear(h, weight)  # [B, T, V]


class CrossEntropy(nn.Module):
    """Per-token cross-entropy in fp32. Tensor parallelism swaps in the vocab-parallel one."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B, T = labels.shape
        return F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(-1), reduction="none").view(B, T)


class GPTModel(nn.Module):
    def __init__(self, cfg, ep_rank: int = 0, ep_size: int = 1):
        """``cfg``: ModelConfig. ``ep_rank/ep_size`` say which experts this rank holds (layout only)."""
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, H)
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        layers = []
        for i, num_experts in enumerate(cfg.moe.experts_per_layer(cfg.num_layers)):
            if cfg.moe.is_moe_layer(i, num_experts):
                mlp = MoELayer(cfg.moe, H, cfg.ffn_hidden_size, num_experts, layer_number=i,
                               ep_rank=ep_rank, ep_size=ep_size,
                               dense_mlp_factory=lambda: MLP(H, cfg.ffn_hidden_size))
            else:
                mlp = DenseMLPBlock(H, cfg.ffn_hidden_size)
            layers.append(TransformerLayer(cfg, i, mlp))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = layer_norm(H, cfg.layernorm_epsilon)
        self.output_layer = TiedOutputLayer()  # no parameters of its own
        self.loss_fn = CrossEntropy()

    def _fused_output_loss(self) -> bool:
        """The tied projection and the loss fuse into one step unless tensor parallelism swapped them out."""
        return type(self.output_layer) is TiedOutputLayer and type(self.loss_fn) is CrossEntropy

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Megatron init: N(0, std) weights, output layers N(0, std / sqrt(2 L)), zero biases, unit norms.

        Dense parameters draw from one generator in a fixed order; experts from their own
        generators, so initial weights are the same under any expert-parallel layout.
        """
        std = self.cfg.init_method_std
        out_std = init_std_for_output(std, self.cfg.num_layers)
        g = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.LayerNorm,)) or type(module).__name__ == "FusedLayerNorm":
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.empty_like(module.weight).normal_(0.0, std, generator=g))
            elif isinstance(module, nn.Linear):
                s = out_std if is_output_layer(module) else std
                module.weight.copy_(torch.empty_like(module.weight).normal_(0.0, s, generator=g))
                if module.bias is not None:
                    module.bias.zero_()
        for layer in self.moe_layers():
            layer.experts.init_weights(seed, layer.layer_number, std, out_std)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None, position_ids=None,
                token_mask: Optional[torch.Tensor] = None, kv_caches: Optional[list] = None, position_offset: int = 0,
                last_logits_only: bool = False, teacher_logits: Optional[torch.Tensor] = None,
                kd_temperature: float = 1.0):
        """tokens [B, T] -> (logits [B, T, V] or, with labels, per-token loss [B, T] fp32; moe stats list).
        ``last_logits_only``: logits [B, 1, V] of the last position only (generation's prefill).
        ``teacher_logits`` [B, T, V] (with labels; distillation): the loss is the pair (cross-entropy, T^2 * KL to
        the teacher at ``kd_temperature``), [B, T] fp32 each.

        ``token_mask`` [B, T] bool marks real tokens: padding is kept out of MoE routing and capacity, and
        out of attention where it precedes real tokens (left-padded batches; the KV cache remembers it).
        """
        B, T = tokens.shape
        if position_ids is None:
            position_ids = torch.arange(position_offset, position_offset + T, device=tokens.device)[None, :]
        h = self.word_embeddings(tokens) + self.position_embeddings(position_ids)  # [B, T, H]
        h = self.embedding_dropout(h)
        attn_mask = None
        if token_mask is not None or kv_caches is not None:
            attn_mask = padding_attention_mask(token_mask, kv_caches, B, T, tokens.device)
        stats = []
        for i, layer in enumerate(self.layers):
            cache = kv_caches[i] if kv_caches is not None else None
            if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
                h, s = checkpoint(layer, h, token_mask, cache, attn_mask, use_reentrant=False)
            else:
                h, s = layer(h, token_mask, cache, attn_mask)
            if s is not None:
                stats.append(s)
        if last_logits_only and labels is None:
            h = h[:, -1:]  # [B, 1, H]
        h = self.final_layernorm(h)
        if labels is not None and teacher_logits is not None:
            if self._fused_output_loss():
                return linear_cross_entropy_kd(h, self.word_embeddings.weight, labels, teacher_logits, kd_temperature), stats
            logits = self.output_layer(h, self.word_embeddings.weight, gather=True)  # [B, T, V]
            return cross_entropy_and_kd(logits, labels, teacher_logits, kd_temperature), stats
        if labels is not None and self._fused_output_loss():
            return linear_cross_entropy(h, self.word_embeddings.weight, labels), stats  # no [B, T, V] logits kept
        logits = self.output_layer(h, self.word_embeddings.weight, gather=labels is None)  # [B, T, V] (tied)
        if labels is None:
            return logits, stats
        return self.loss_fn(logits, labels), stats
